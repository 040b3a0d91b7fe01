"""configurator.py: command-line and config-file overrides for the stage scripts.

A stage script keeps its settings as plain module globals (nanoGPT's model), one line each:
    max_lr = 6e-4  # peak learning rate of the AdamW groups
and right after them calls
    config = apply_overrides(globals(), sys.argv[1:])
which accepts, in this order of precedence (later wins):
    config files    positional `config/t4.py`, `run.json`, `run.yaml` or `--config path` (applied first, in order)
    flags           `--key=value`, `--key value`, bare `--flag` for a bool (applied after every file, in order)
    `--resume <ckpt>` / `--resume=<ckpt>`   resume=True and checkpoint_path=<ckpt>
    `-h` / `--help` every key with its default and the comment on its line, then exit 0
Unlike nanoGPT's exec'd configurator, every key is checked: a typo or a name from another guide
(`--batch_size`, `--eval_interval`) stops the run with a suggestion instead of being ignored.
"""
import ast
import difflib
import io
import json
import os
import tokenize
import types as pytypes


class UserError(Exception):
    """Bad user input; stage scripts print it as one message and exit 2."""


# Names our users bring from the guides they follow (nanoGPT, HF Trainer, the multi-GPU YAML reference)
# mapped to ours. They are only ever *suggested*: accepting them silently would give one setting two
# names, and a YAML `batch_size` meaning per-GPU in one guide and global in another is exactly the
# ambiguity we want the user to resolve by reading our help line. Several candidates are tried in order
# and only those that are keys of the running script are offered (train_base has no num_epochs, say).
ALIASES = {
    "batch_size": ("device_batch_size",),
    "batch_size_per_gpu": ("device_batch_size",),
    "per_device_train_batch_size": ("device_batch_size",),
    "micro_batch_size": ("device_batch_size",),
    "eval_interval": ("eval_every",),
    "val_interval": ("eval_every",),
    "eval_steps": ("eval_every",),
    "learning_rate": ("max_lr",),
    "learn_rate": ("max_lr",),
    "lr": ("max_lr",),
    "min_learning_rate": ("min_lr",),
    "gradient_accumulation_steps": ("grad_accum_steps", "total_batch_size", "target_examples_per_step"),
    "grad_accumulation_steps": ("grad_accum_steps", "total_batch_size", "target_examples_per_step"),
    "accumulation_steps": ("grad_accum_steps", "total_batch_size", "target_examples_per_step"),
    "max_iters": ("max_steps",),
    "num_steps": ("max_steps",),
    "total_steps": ("max_steps",),
    "epochs": ("num_epochs",),
    "num_train_epochs": ("num_epochs",),
    "block_size": ("max_seq_len",),
    "seq_len": ("max_seq_len",),
    "max_seq_length": ("max_seq_len",),
    "model_max_length": ("max_seq_len",),
    "n_layer": ("depth",),
    "num_layers": ("depth",),
    "save_steps": ("checkpoint_interval",),
    "ckpt_interval": ("checkpoint_interval",),
    "save_interval": ("checkpoint_interval",),
    "logging_steps": ("log_every",),
    "log_interval": ("log_every",),
    "warmup_iters": ("warmup_steps",),
    "out_dir": ("out_dir", "log_dir"),
    "output_dir": ("out_dir", "log_dir"),
    "is_keep_training": ("auto_resume",),
    "resume_from_checkpoint": ("checkpoint_path",),
    "ckpt_path": ("checkpoint_path",),
    "init_from": ("pretrained_checkpoint",),
    "model_name_or_path": ("pretrained_checkpoint",),
    "data_path": ("data_root", "mixture", "dolly_path"),
    "data_dir": ("data_root", "mixture"),
    "max_grad_norm": ("grad_clip",),
    "fp16": ("dtype",),
    "bf16": ("dtype",),
    "use_wandb": ("wandb_log",),
    "lr_reference_batch": ("lr_reference_examples",),  # SFT and Dolly count examples, not tokens
}

# An extra sentence for the aliases whose meaning is not one-to-one with ours.
ALIAS_NOTES = {
    "total_batch_size": "it counts tokens per optimizer step, and we derive grad accumulation as "
                        "total_batch_size / (device_batch_size * max_seq_len * world_size)",
    "dtype": "precision is one key here, e.g. --dtype=float16 or --dtype=bfloat16",
    "target_examples_per_step": "it counts conversations per optimizer step over all GPUs = device_batch_size x "
                                "accumulation x GPUs (device_batch_size=1 with accumulation 64 on one GPU is 64), "
                                "and the accumulation follows from it",
    "lr_reference_examples": "SFT and Dolly batches are counted in examples (conversations, rows), like "
                             "target_examples_per_step; lr_reference_batch (tokens) belongs to train_base/train_mid",
    "mixture": "it lists the conversation files, e.g. --mixture=smol-smoltalk-6k.json or a,b:0.5 with weights",
}

# Keys of the guides' own scripts that t4chat has no use for: what to do instead, in one sentence.
NO_EQUIVALENT = {
    "use_large_config": "the guide's large-dataset settings are a config file here: "
                        "python train_base.py config/large_dataset.py",
    "log_level": "there are no log levels; log_every sets how often a step is logged",
    "num_workers": "the loader reads and tokenizes in its own background thread; there are no workers to set",
    "pin_memory": "batches are pinned automatically on CUDA",
    "dataloader_buffer_size": "the loader streams a slice of rows at a time and needs no buffer setting",
    "ultra_low_mem": "the loader always streams, so memory stays bounded without a switch",
    "save_config": "the config is saved in every checkpoint and at the top of train.log",
    "dynamic_seq_length": "windows are packed to max_seq_len (pretraining) or padded per batch (SFT)",
    "model_parallel": "t4chat is data parallel (DDP) only; lower device_batch_size or use "
                      "--gradient_checkpointing=True to fit a bigger model",
}

# torchrun's own options end up after the script name when a user forgets the order.
LAUNCHER_FLAGS = {"nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "standalone"}

MISSING = object()   # `--max_lr` with nothing after it (None is a real value for _types keys)
BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}
SCALAR_TYPES = (bool, int, float, str)


def config_keys(g, types=None):
    """The config globals of `g` (sorted): the dict we print, save in checkpoints and send to wandb."""
    declared = _declared_types(g, types)
    return {k: g[k] for k in sorted(g) if _is_key(k, g[k], declared)}


# STYLE.md 3.2 calls the same snapshot by this name.
snapshot_config = config_keys


def apply_overrides(g, argv, types=None, named=None):
    """Apply config files and --key=value flags from `argv` to the globals `g`; return the effective config.

    `types` (merged over g['_types']) declares the type of keys whose default is None.
    Every problem in argv is collected and raised as one UserError, so a user fixes them in one go.
    `named`, a set, receives every key a --flag set, even to its default value (files are presets; a flag is
    the user's own word, so --matrix_lr=0.02 pins matrix_lr although 0.02 is its default).
    """
    declared = _declared_types(g, types)
    # each key's type is fixed by its default before anything is applied, so a file can't change it
    keys = {k: _key_type(g[k], declared.get(k)) for k in config_keys(g, declared)}
    argv = list(argv)
    # help wins over everything else on the line: a user asking for it wants the list, not an error
    if "-h" in argv or "--help" in argv:
        print(help_text(g, keys))
        raise SystemExit(0)
    files, flags, errors = _split_argv(argv, keys)
    # we stage every value in `updates` and write g only when all are valid: a half-applied config
    # would be printed and saved in checkpoints as if the user had asked for it
    updates = {}
    for path in files:
        for key, value, origin in _read_config_file(path, errors):
            _set(updates, keys, key, value, origin, errors, g, declared)
    for key, value in flags:
        _set(updates, keys, key, value, None, errors, g, declared)
    if errors:
        # one message for all problems, so a user with a whole guide's worth of old names fixes them at once
        raise UserError(errors[0] if len(errors) == 1 else
                        f"{len(errors)} problems with the settings:\n" + "\n".join(f"  - {e}" for e in errors))
    g.update(updates)
    if named is not None:
        named.update(key for key, _ in flags if key in updates)
    return config_keys(g, declared)


# ---- what counts as a key, and its type ----

def _declared_types(g, types):
    return {**(g.get("_types") or {}), **(types or {})}


def _is_key(name, value, declared):
    if name.startswith("_"):
        return False
    if value is None:
        return name in declared
    # only scalars: imported modules, functions and helper objects in the script are not settings
    return isinstance(value, SCALAR_TYPES)


def _key_type(default, declared):
    return declared if declared is not None else type(default)


def _type_name(t):
    return getattr(t, "__name__", str(t))


# ---- argv -> (config files, flags) ----

def _split_argv(argv, keys):
    """Walk argv once. Returns (config file paths, [(key, raw text | True | MISSING)], errors)."""
    files, flags, errors = [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            # torchrun ... train_base.py -- --device_batch_size=2 (the t4 guide's form)
            continue
        if not arg.startswith("-") or _is_number(arg):
            # nanoGPT's convention: a bare argument is a config file (checked, with hints, when read)
            files.append(arg)
            continue
        if not arg.startswith("--"):
            errors.append(f"unknown option {arg!r}: config keys take two dashes, e.g. --max_lr=3e-4 "
                          f"(run with --help to list them)")
            continue
        key, has_eq, text = arg[2:].partition("=")
        nxt = argv[i] if i < len(argv) else None
        takes_next = nxt is not None and not nxt.startswith("--")
        if key == "config":
            if not has_eq and not takes_next:
                errors.append("--config needs a path, e.g. --config=config/t4.yaml")
                continue
            if not has_eq:
                text, i = nxt, i + 1
            files.append(text)
            continue
        if not has_eq:
            text, i = _value_after(key, keys, nxt, takes_next, i)
        flags.append((key, text))
    return files, flags, errors


def _value_after(key, keys, nxt, takes_next, i):
    """`--key value` form: decide whether the next token is this key's value. Returns (value, new i)."""
    if keys.get(key) is bool:
        if takes_next and nxt.lower() in BOOL_WORDS:
            return nxt, i + 1
        if takes_next and key == "resume" and "checkpoint_path" in keys and not _looks_like_config(nxt):
            # `--resume ckpt.pt` (the multi-GPU guide's form); a config file after a bare --resume stays a file
            return nxt, i + 1
        # bare `--auto_resume` means True; `--resume --checkpoint_path x` is this case too
        return True, i
    if takes_next:
        # for unknown keys too: `--batch_size 16` should report batch_size once, not also a file named '16'
        return nxt, i + 1
    return MISSING, i   # `--max_lr` with nothing after it; _set reports it


def _is_number(arg):
    try:
        float(arg)
        return True
    except ValueError:
        return False


def _looks_like_config(path):
    return os.path.splitext(path)[1].lower() in (".py", ".json", ".yaml", ".yml")


# ---- config files ----

def _read_config_file(path, errors):
    """[(leaf key, value, (path, dotted name))] from one config file; problems go to `errors`."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        errors.append(_missing_file_message(path))
        return []
    if ext not in (".py", ".json", ".yaml", ".yml"):
        errors.append(f"config file {path!r} has an unsupported type {ext or '(none)'!r}: "
                      f"use a .py, .json, .yaml or .yml file")
        return []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = _parse_config_text(path, ext, text)
    except UnicodeDecodeError:
        errors.append(f"config file {path!r} is not UTF-8 text; save it as UTF-8")
        return []
    except UserError as e:
        errors.append(str(e))
        return []
    if ext == ".py":
        return [(k, v, (path, k)) for k, v in data.items()]
    return _flatten(data, path, errors)


def _missing_file_message(path):
    """Positional args are config files, so a forgotten `--` or a checkpoint path lands here."""
    msg = f"config file {path!r} not found (arguments without a leading -- are config files)"
    if "=" in path:
        return msg + f"; for a setting write --{path}"
    if path.endswith(".pt"):
        return msg + f"; to resume from a checkpoint write --resume {path}"
    return msg + "; check the path, or write settings as --key=value"


def _parse_config_text(path, ext, text):
    """The file's text -> a dict (nested for JSON/YAML); UserError naming the file when it can't be read."""
    if ext == ".py":
        return _exec_py(path, text)
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path!r} is not valid JSON ({e}); fix the file") from None
    else:
        try:
            import yaml   # only YAML users need pyyaml (requirements.txt lists it)
        except ImportError:
            raise UserError(f"config file {path!r} needs pyyaml: pip install pyyaml, "
                            f"or use a .json or .py config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"config file {path!r} is not valid YAML ({e}); fix the file") from None
    if data is None:
        return {}   # an empty YAML file sets nothing
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping (key: value) at the top, "
                        f"got a {type(data).__name__}")
    return data


def _exec_py(path, text):
    """Run a .py config in its own namespace (never in the script's globals, so a typo can't hide)."""
    ns = {"__file__": path, "__name__": "__config__"}
    try:
        exec(compile(text, path, "exec"), ns)
    except Exception as e:  # noqa: BLE001 - any failure in a user's file is a user error
        raise UserError(f"config file {path!r} failed to run: {type(e).__name__}: {e}; fix the file") from None
    # the large-dataset guide keeps its settings as fields of a class (class TrainConfigPretrainLarge:
    # device_batch_size: int = 32 ...); silently ignoring them would train with the defaults
    def fields_of(cls):
        return {k: v for k, v in vars(cls).items() if not k.startswith("_") and not callable(v)
                and not isinstance(v, (classmethod, staticmethod, property))}
    classes = [v for v in ns.values() if isinstance(v, type) and v.__module__ == "__config__" and fields_of(v)]
    if classes:  # a helper class with methods only is fine; one holding values is the guide's settings class
        cls = classes[0]
        fields = fields_of(cls)
        lines = "; ".join(f"{k} = {v!r}" for k, v in list(fields.items())[:6]) + ("; ..." if len(fields) > 6 else "")
        raise UserError(f"config file {path!r} defines class {cls.__name__}: a config file sets top-level "
                        f"`key = value` lines, and settings inside a class are not read. Move its fields to the top "
                        f"level ({lines}), one per line, without the type annotations")
    # imports and helper functions in the file are not settings
    return {k: v for k, v in ns.items()
            if not k.startswith("_") and not callable(v) and not isinstance(v, pytypes.ModuleType)}


def _flatten(data, path, errors):
    """Nested sections -> leaf names: {'training': {'max_lr': 1e-4}} gives ('max_lr', 1e-4, ...).

    The guides group keys under `data:` / `training:`; our keys are flat and unique, so the leaf name is
    enough. The same leaf in two sections with different values is ambiguous, so we refuse it.
    """
    out, seen = [], {}
    queue = [("", data)]   # breadth first: top-level keys, then each section
    while queue:
        prefix, node = queue.pop(0)
        for k, v in node.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict):
                queue.append((dotted + ".", v))
                continue
            name = str(k)
            if name in seen and seen[name][1] != v:
                errors.append(f"config file {path!r} sets {name!r} twice with different values "
                              f"({seen[name][0]}={seen[name][1]!r} and {dotted}={v!r}); keep one")
                continue
            seen[name] = (dotted, v)
            out.append((name, v, (path, dotted)))
    return out


# ---- checking one (key, value) ----

def _set(updates, keys, key, value, origin, errors, g, declared):
    """Check one setting and stage it in `updates`. origin: None for the CLI, else (file, dotted name)."""
    if key not in keys:
        errors.append(_unknown_key_message(key, value, origin, keys, g))
        return
    want = keys[key]
    if key == "resume" and want is bool and "checkpoint_path" in keys and isinstance(value, str) \
            and value.strip().lower() not in BOOL_WORDS:
        # --resume=<ckpt> / --resume <ckpt>: resume from this exact file
        updates["resume"] = True
        updates["checkpoint_path"] = value
        return
    try:
        # a key declared in _types may be None, even after an earlier run set it (g is not the source file)
        updates[key] = _coerce(value, want, nullable=key in declared)
    except (ValueError, TypeError) as e:
        errors.append(_bad_value_message(key, value, want, origin, str(e)))


def _coerce(value, want, nullable):
    """Text (from the CLI, or a YAML string like '1e-4') or an object (from a file) -> a value of type `want`."""
    if value is MISSING:
        raise ValueError("no value given")
    if nullable and (value is None or value == "None"):
        return None   # keys declared in _types may be set back to None
    if want is str:
        if isinstance(value, (list, tuple)):
            # permanent_checkpoints: [10000, 20000] in YAML means the same as '10000,20000' on the CLI
            return ",".join(str(x) for x in value)
        if value is None or isinstance(value, dict):
            raise ValueError("")
        return value if isinstance(value, str) else str(value)
    if want not in (bool, int, float):
        return want(value)   # a custom type from _types; its own error explains itself
    if isinstance(value, str):
        value = _parse_text(value, want)
    # bool is a subclass of int, so each branch rules it in or out explicitly
    if want is bool and (isinstance(value, bool) or (type(value) is int and value in (0, 1))):
        return bool(value)
    if want is int and type(value) is int:
        return value
    if want is int and isinstance(value, float) and value.is_integer():
        raise ValueError(f"write it as a whole number, e.g. {int(value)}")
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)   # an int is fine for a float key: --min_lr=0
    raise ValueError("")


def _parse_text(text, want):
    """CLI text -> a Python value (still unchecked), per the key's type."""
    if want is bool:
        return BOOL_WORDS.get(text.strip().lower(), text)   # unknown words fail the type check
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if want is float:
        try:
            return float(text)   # 'inf' and 'nan' are floats but not literals
        except ValueError:
            pass
    return text


def _bad_value_message(key, value, want, origin, detail):
    """`--max_lr expects float, got 'abc' (use a number, e.g. 3e-4)`: the problem, then the fix."""
    where = f"--{key}" if origin is None else f"{origin[1]} in config file {origin[0]!r}"
    if value is MISSING:
        return f"{where} needs a value, e.g. --{key}={_example(want)}"
    fix = detail or {bool: f"use True/False/true/false/1/0, or a bare --{key} for True",
                     int: "use a whole number, e.g. 1000",
                     float: "use a number, e.g. 3e-4",
                     str: "use text, or a list for a comma-separated value"}.get(want, "")
    head = f"{where} expects {_type_name(want)}, got {value!r}"
    return f"{head} ({fix})" if fix else head


def _example(want):
    return {bool: "True", int: "1000", float: "3e-4"}.get(want, "text")


# ---- unknown keys ----

def _suggest(key, keys):
    """The known key the user most likely meant, or None."""
    norm = key.replace("-", "_").lower()
    for cand in ALIASES.get(norm, ()):
        if cand in keys:
            return cand
    lowered = {k.lower(): k for k in keys}
    if norm in lowered:
        return lowered[norm]            # --max-lr or --Max_LR
    if norm.startswith("no_") and keys.get(lowered.get(norm[3:])) is bool:
        return lowered[norm[3:]]        # HF/argparse style --no_compile
    close = difflib.get_close_matches(norm, list(lowered), n=1, cutoff=0.6)
    if close:
        return lowered[close[0]]
    # a typo of a guide's name (learning_rat) still leads to ours
    close = difflib.get_close_matches(norm, list(ALIASES), n=1, cutoff=0.8)
    if close:
        return next((c for c in ALIASES[close[0]] if c in keys), None)
    return None


def _unknown_key_message(key, value, origin, keys, g):
    place = "" if origin is None else f" in config file {origin[0]!r} ({origin[1]})"
    msg = f"unknown config key {key!r}{place}"
    if key in LAUNCHER_FLAGS:
        script = os.path.basename(g.get("__file__") or "train_base.py")
        return (msg + f": {key} is a torchrun option; put it before the script name, "
                f"e.g. torchrun --standalone --{key}=4 {script} ...")
    if g.get(key, 0) is None and not key.startswith("_"):
        return (msg + f": its default is None and its type is undeclared; add {key!r} to the script's "
                "_types dict (a fix in the script, not in your command)")
    norm = key.replace("-", "_").lower()
    if norm in NO_EQUIVALENT:
        return msg + f": not a setting here; {NO_EQUIVALENT[norm]}. Drop it from the command or file"
    best = _suggest(key, keys)
    if best is None:
        return msg + ": no similar key; run the script with --help to list every key"
    note = ALIAS_NOTES.get(best)
    if origin is not None:
        how = f"rename it to {best!r}"
    elif note:
        how = f"set --{best}"   # the meaning differs, so the user's number would be wrong here
    elif key.lower().startswith("no_") and keys[best] is bool:
        how = f"write --{best}=False"
    elif isinstance(value, str):
        how = f"write --{best}={value}"
    else:
        how = f"write --{best}" if keys[best] is bool else f"write --{best}=<value>"
    return msg + f" (did you mean {best!r}? {how}{'; ' + note if note else ''})"


# ---- help ----

def _source_comments(path):
    """{name: trailing comment} for module-level assignments of the script at `path`, in source order."""
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        comments = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, UnicodeDecodeError):
        return {}
    out = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and not out.get(t.id):
                # the comment sits on the assignment's last line (a default may span lines)
                out[t.id] = comments.get(node.end_lineno, "")
    return out


def help_text(g, keys=None):
    """The --help page: the script's docstring, then every key with its default and its comment."""
    keys = keys if keys is not None else config_keys(g)
    comments = _source_comments(g.get("__file__"))
    for path in g.get("_help_files") or ():  # keys the script takes from elsewhere (trainer.with_shared_defaults)
        comments |= {k: v for k, v in _source_comments(path).items() if k not in comments}
    order = [k for k in comments if k in keys] + sorted(k for k in keys if k not in comments)
    script = os.path.basename(g.get("__file__") or "script.py")
    lines = [(g.get("__doc__") or "").strip(), "",
             f"usage: python {script} [config.py|.json|.yaml ...] [--key=value ...]",
             "config files apply first (in order), then flags; a bool also takes a bare --flag (= True);",
             "--resume <ckpt> resumes from that checkpoint. Keys and defaults:"]
    width = max((len(f"--{k}={_show(g.get(k))}") for k in order), default=0)
    for k in order:
        left = f"--{k}={_show(g.get(k))}"
        note = comments.get(k, "")
        lines.append(f"  {left:<{width}}  # {note}" if note else f"  {left}")
    return "\n".join(lines).strip("\n")


def _show(value):
    return "''" if value == "" else str(value)
