"""export_hf.py: a checkpoint as a Hugging Face model folder, loadable offline by transformers and servable by vLLM.
in:  --checkpoint (a ckpt_*.pt, a run folder, or a stage name: base, mid, sft, dolly; "" = the newest SFT run, else
     dolly, mid, base)
out: --out folder: config.json (LlamaConfig), model.safetensors, generation_config.json, tokenizer.json and
     tokenizer_config.json (the chat specials and a chat_template that renders our chat format), t4chat.json (where
     it came from: checkpoint, step, stage, commit)
     python export_hf.py --checkpoint=sft --out=my_chat_model                # float16: T4s and vLLM on them
     python export_hf.py --checkpoint=base --out=my_base --dtype=bfloat16
then AutoModelForCausalLM.from_pretrained("my_chat_model") and AutoTokenizer.from_pretrained("my_chat_model"):
the same logits and ids as ours, and apply_chat_template(..., add_generation_prompt=True) gives our prompt.
Before the folder appears, transformers loads it and we compare (--verify); a failed or killed export leaves no
half folder behind.
"""
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import common
from common import UserError
from configurator import apply_overrides

# ---- config (module globals; override with --key=value; -h lists them) -----------------------------------------
checkpoint = ""               # a ckpt_*.pt, a run folder, or a stage name; "" = newest sft, else dolly, mid, base
out = ""                      # the folder to write (required); it must not exist or be empty, unless --overwrite
dtype = "float16"             # float16 (T4/V100: vLLM refuses bf16 there) | bfloat16 | float32 (the weights as trained)
overwrite = False             # replace an earlier export at --out (once the new one is complete and verified)
verify = True                 # load the export with transformers and compare logits, ids and chat template with ours
# ------------------------------------------------------------------------------------------------------------------

DEFAULT_STAGES = ("sft", "dolly", "mid", "base")


def check_settings(dest: Path):
    import hf
    if dtype not in hf.DTYPES:
        raise UserError(f"dtype={dtype!r} is not one of {', '.join(hf.DTYPES)}; float16 for T4/V100 (and vLLM on "
                        f"them), bfloat16 for Ampere and newer, float32 to keep every bit")
    if not out:
        raise UserError("no output folder; pass --out=<folder> (e.g. --out=my_model)")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--out={out} is a file; pass a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise UserError(f"{dest} exists and is not empty; pass --overwrite=True to replace it, or another --out")
        # --overwrite deletes the folder: only ever an earlier export, never a run folder or home named by a typo
        if not (dest / "config.json").is_file():
            raise UserError(f"{dest} is not a Hugging Face export (no config.json), so --overwrite will not delete "
                            f"it; pass another --out")


def provenance(meta, tok) -> dict:
    import transformers
    return {"exported_by": "t4chat export_hf.py", "exported_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "checkpoint": str(Path(meta["path"]).resolve()), "stage": meta["stage"], "step": meta["step"],
            "arch": meta["arch"], "tokenizer": tok.describe(), "dtype": dtype, "git": common.git_hash(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def replace_folder(tmp: Path, dest: Path):
    """Move the finished export into place. An old export (--overwrite) is renamed aside first and deleted last, so
    a kill at any point leaves whole folders only: the old export (at dest, or aside as .<name>.old-<pid>) or the
    new one, never a mix of the two."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else argv)
    from checkpoint import load_model
    import hf
    dest = Path(out).expanduser().resolve()
    check_settings(dest)
    model, tok, meta = load_model(checkpoint, "cpu", default_stage=DEFAULT_STAGES, key="checkpoint")
    for note in meta["notes"]:
        print(note)
    # a chat template's stop tokens for every chat stage; a base model stops at bos (chat.py draws the same line)
    chat = meta["stage"] != "base"
    print(f"exporting {meta['path']} (stage {meta['stage']}, step {meta['step']}, {model.num_params():,} parameters, "
          f"tokenizer {tok.name}) as {dtype} to {dest}")
    # written beside dest, so the final rename stays on one filesystem; the dot keeps it out of stage listings
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = provenance(meta, tok)
        files = hf.write_hf_folder(model, tok, tmp, dtype=dtype, chat=chat, provenance=info)
        if verify:
            from transformers.utils import logging as hf_logging
            # its progress bar and warnings (a check text longer than a tiny model's max_seq_len) are about our own
            # check, not the user's use of the folder; a real problem is an error, which still shows
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            figures = hf.check_hf_folder(tmp, model, tok)
            print(f"verified with transformers: ids and chat template identical; logits differ from ours by at most "
                  f"{figures['max_abs_logit_diff']:.2g} over {figures['tokens']} tokens (float32 on the "
                  f"{dtype} weights)")
            info["verified"] = figures
            hf.write_provenance(tmp, info)
        replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    size = sum((dest / f).stat().st_size for f in files)
    print(f"wrote {', '.join(files)} ({size / 2 ** 20:.1f} MiB) to {dest}\n"
          f"load: AutoModelForCausalLM.from_pretrained({str(dest)!r}); AutoTokenizer.from_pretrained({str(dest)!r})")


if __name__ == "__main__":
    common.run(main)
