"""The repo's shape: imports go one way, and generation, checkpoint loading and evaluation each live in one place.
python -m pytest -q tests/test_layout.py"""
import ast
import json
import subprocess
import sys
from collections import defaultdict

from conftest import REPO

# Stage scripts and faces on top; the stage runtime, data and evaluation in the middle; the model, the
# optimizer, the tokenizer with its chat format, and the configurator at the bottom, knowing no files,
# processes or globals.
BOTTOM = {"configurator", "optim", "model", "chat_format", "tokenizer"}
MIDDLE = {"common", "defaults", "schedule", "checkpoint", "trainer", "dataloader", "conversations",
          "conversation_loader", "tasks", "evaluate", "engine", "preflight", "hf"}
TOP = {"train_base", "train_mid", "train_sft", "finetune_dolly", "chat", "bench", "bench_baseline", "prepare_data",
       "check_gpus", "train_tokenizer", "eval", "export_hf", "report", "serve", "bench_serve"}


def _imports(name):
    """Every repo module `name`.py imports, at its top or inside a function (a lazy import is still an import)."""
    tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & (BOTTOM | MIDDLE | TOP)


def test_every_module_has_a_layer():
    assert {p.stem for p in REPO.glob("*.py")} == BOTTOM | MIDDLE | TOP, "a new module: give it a layer here"


def test_imports_point_down_only():
    for name in BOTTOM:
        assert _imports(name) <= BOTTOM, (name, _imports(name) - BOTTOM)
    for name in MIDDLE:
        assert _imports(name) <= BOTTOM | MIDDLE, (name, _imports(name) - BOTTOM - MIDDLE)


def test_each_module_imported_alone_pulls_in_no_stage_script_or_face():
    """One interpreter imports each module of the lower layers by itself (the repo's modules are dropped from
    sys.modules in between; torch stays loaded, which only saves time) and lists what came with it."""
    code = (f"import importlib, json, sys; sys.path.insert(0, {str(REPO)!r})\n"
            f"repo = {sorted(BOTTOM | MIDDLE | TOP)!r}\n"
            "out = {}\n"
            f"for name in {sorted(BOTTOM | MIDDLE)!r}:\n"
            "    for m in [m for m in sys.modules if m in repo]: del sys.modules[m]\n"
            "    importlib.import_module(name)\n"
            "    out[name] = sorted(m for m in sys.modules if m in repo and m != name)\n"
            "print(json.dumps(out))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(loaded) == BOTTOM | MIDDLE
    for name, modules in loaded.items():
        assert not set(modules) & TOP, (name, modules)
        if name in BOTTOM:
            assert set(modules) <= BOTTOM, (name, modules)


def test_no_function_or_class_is_defined_in_two_modules():
    # bench_baseline.py is nanoGPT's model and schedule on purpose: the baseline bench.py measures us against
    defined = defaultdict(list)
    for name in BOTTOM | MIDDLE | TOP - {"bench_baseline"}:
        for node in ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "main":
                defined[node.name].append(name)
    assert {k: v for k, v in defined.items() if len(v) > 1} == {}


def test_sampling_checkpoint_reading_and_text_metrics_each_have_one_home():
    """What the issue names: generation (engine.py), loading checkpoints (checkpoint.py), BLEU/ROUGE (evaluate.py).
    A face that needs them calls those modules; none re-implements them."""
    homes = {"torch.multinomial(": {"engine"}, "torch.load(": {"checkpoint"}, "import sacrebleu": {"evaluate"},
             "rouge_scorer.RougeScorer(": {"evaluate"}, "KVCache(": {"engine"}}
    for needle, home in homes.items():
        users = {p.stem for p in REPO.glob("*.py") if needle in p.read_text(encoding="utf-8")} - {"bench_baseline"}
        assert users == home, (needle, users)
