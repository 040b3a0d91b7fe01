"""train_base.py: pretrain a base model on parquet text (stage 1 of the T4 guide).
in:  parquet shards under data_root      out: $NANOCHAT_BASE_DIR/checkpoints/<run_name or d<depth>>/
CPU smoke:  python train_base.py --depth=2 --max_seq_len=128 --device_batch_size=4 --total_batch_size=1024 \
                --max_steps=60 --eval_every=20 --data_root=../shared/data/pretrain --device=cpu --compile=False
4x T4:      torchrun --standalone --nproc_per_node=4 train_base.py
Overrides:  python train_base.py config/t4.py --depth=8   (config files: .py, .json, .yaml; -h lists every key)
"""
import torch

import common
from common import print0
from training import Stage

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# model
depth = 12                    # number of transformer layers: the one size dial (width = 64 * depth)
n_embd = -1                   # model width; -1 = 64 * depth
n_head = -1                   # attention heads; -1 = width / 128
n_kv_head = -1                # key/value heads (grouped-query attention when < n_head); -1 = n_head
max_seq_len = 1024            # tokens per sequence (the T4 guide: 1024; lower it first when out of memory)
tokenizer = "gpt2"            # gpt2 | bytes (tiny smoke tests) | <path to a trained BPE>
gradient_checkpointing = False  # recompute activations in backward: less memory, ~30% more compute
# data
data_root = ""                # folder of parquet shards; "" = $NANOCHAT_BASE_DIR/base_data
val_files = ""                # comma-separated shard names for validation; "" = the last shard
# batch: total_batch_size = device_batch_size * max_seq_len * world_size * grad_accum_steps
device_batch_size = 4         # sequences per GPU per micro-step
total_batch_size = 131072     # tokens per optimizer step over all GPUs; -1 = use grad_accum_steps
grad_accum_steps = -1         # micro-steps per optimizer step per GPU; -1 = derived from total_batch_size
# horizon
max_steps = -1                # optimizer steps; -1 = from num_epochs, else from target_param_data_ratio
num_epochs = -1.0             # passes over the training shards; -1 = use max_steps
target_param_data_ratio = 20  # tokens per parameter when max_steps and num_epochs are -1 (Chinchilla: 20)
# optimizer and schedule
optimizer = "muon"            # muon (Muon for hidden matrices + AdamW for the rest) | adamw
max_lr = 0.004                # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.02              # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = -1.0                 # final learning rate; -1 = max_lr / 10 (scaled alike for matrix_lr)
warmup_steps = -1             # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = 0.0            # warmup as a fraction of max_steps; -1 = use warmup_steps
lr_scheduler = "cosine"       # cosine | linear | constant | cosine_with_restarts
lr_restarts = 1               # cycles of cosine_with_restarts
decay_lr = True               # False = constant after warmup
lr_scaling = "none"           # none | linear | sqrt: scale max_lr with the global batch / lr_reference_batch
lr_reference_batch = -1       # tokens; -1 = one process's batch (so scaling follows the GPU count)
weight_decay = 0.0            # AdamW weight decay on 2-D weights
grad_clip = 1.0               # clip the global gradient norm; 0 = off
# evaluation and sampling
eval_every = 100              # steps between validation loss / bpb; -1 = only at the end
eval_tokens = -1              # validation tokens per evaluation (all GPUs); -1 = 10 x total_batch_size, at most 524288
sample_every = 500            # steps between sampled completions; -1 = off
log_every = 1                 # steps between log lines
log_gradients = False         # add per-layer gradient norms to the metrics
# checkpoints
checkpoint_interval = 1000    # steps between checkpoints; -1 = only at the end
keep_last_n_checkpoints = 5   # rotation: keep this many newest; -1 = keep all
permanent_checkpoints = ""    # steps never deleted, e.g. "10000,20000"
keep_best_n = 0               # also keep the n checkpoints with the lowest val loss
auto_resume = False           # continue from the newest complete checkpoint of this run
resume = False                # continue from checkpoint_path (--resume=<path> sets both)
checkpoint_path = ""          # the checkpoint to resume (a ckpt_*.pt or a run folder)
pretrained_checkpoint = ""    # start from these weights (file, run folder, or stage name); "" = from scratch
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/checkpoints/<run_name>
run_name = ""                 # "" = d<depth>
log_dir = ""                  # train.log + metrics.jsonl; "" = the run's checkpoint folder
# runtime
device = "auto"               # auto | cpu | cuda | cuda:N
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16+GradScaler below, fp32 on CPU) | float32 | float16 | bfloat16
compile = None                # torch.compile; None = auto (CUDA sm>=7.0, not Windows)
peak_flops = None             # peak FLOP/s of one GPU for MFU when it is not in our table
seed = 42
wandb_log = False             # log to Weights & Biases (WANDB_MODE=offline works)
wandb_project = "t4chat"
max_nonfinite = 10            # stop after this many non-finite losses in a row
_types = {"compile": bool, "peak_flops": float}
# -----------------------------------------------------------------------------------------------------------




def main():
    import dataloader
    st = Stage(globals(), "base")
    c = st.config

    # ---- batch and data: validated before any process group or compile ----
    total, accum = common.resolve_batch(total_batch_size=c["total_batch_size"], grad_accum_steps=c["grad_accum_steps"],
                                        device_batch_size=device_batch_size, max_seq_len=max_seq_len,
                                        world_size=st.world_size, user_set=st.user_set)
    root = data_root or str(common.base_dir() / "base_data")
    train_shards = dataloader.list_shards(root, "train", val_files)
    val_shards = dataloader.list_shards(root, "val", val_files)

    def names(paths):  # every *.parquet in data_root trains unless it is validation: say which ones, in the log
        return ", ".join(p.name for p in paths) if len(paths) <= 4 else f"{paths[0].name} .. {paths[-1].name}"

    # ---- setup and model ----
    st.setup()
    model = st.build_model()
    tok, dev = st.tok, st.device

    # ---- horizon: max_steps, or num_epochs over the training shards, or target_param_data_ratio tokens/param ----
    def steps_per_epoch():
        tokens, how = dataloader.estimate_tokens(train_shards, tok)
        print0(f"num_epochs: {how}; one epoch = {tokens:,} tokens / {total:,} per step")
        return tokens / total
    # lr_scaling reference: with grad_accum_steps given per GPU, the global batch grows with the GPU count and the
    # LR follows it (the multi-GPU guide's automatic scaling); with total_batch_size fixed the factor is 1
    reference = total // st.world_size if "grad_accum_steps" in st.user_set else total
    steps, warmup, peak_lr, final_lr = st.schedule(
        model, steps_per_epoch=steps_per_epoch, global_batch=total, reference_batch=reference,
        default_steps=lambda: max(1, target_param_data_ratio * model.num_params() // total))

    # ---- data ----
    loader_args = dict(device_batch_size=device_batch_size, max_seq_len=max_seq_len, rank=st.rank,
                       world_size=st.world_size, val_files=val_files, device=dev)
    train_loader = dataloader.PretrainLoader(root, tok, split="train", **loader_args)
    val_loader = dataloader.PretrainLoader(root, tok, split="val", **loader_args)
    n_eval = (eval_tokens if eval_tokens > 0 else min(10 * total, 524288)) // (device_batch_size * max_seq_len *
                                                                                 st.world_size)
    token_bytes = tok.token_bytes().to(dev)

    def evaluate(m, step):
        return st.eval_loss(m, val_loader, n_eval, token_bytes)

    def sample(m):
        """A few completions so a human sees what the model learned. A private generator keeps the training
        RNG untouched (exact resume)."""
        gen = torch.Generator(device=dev).manual_seed(0)
        m.eval()
        for prompt in ("The capital of France is", "The meaning of life is", "中国的首都是"):
            ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=dev)
            with torch.no_grad(), st.autocast:
                out = m.generate(ids, max_new_tokens=min(24, max_seq_len - ids.size(1)), temperature=0.7, top_k=50,
                                 generator=gen)
            st.logger.print(f"sample: {tok.decode(out[0, 1:].tolist())!r}")
        m.train()

    # ---- loop ----
    try:
        st.fit(model, train_loader, accum=accum, steps=steps, warmup=warmup, peak_lr=peak_lr, final_lr=final_lr,
               evaluate=evaluate, sample=sample,
               header={"batch": f"{total:,} tokens/step = {device_batch_size} seqs x {max_seq_len} tokens x "
                                f"{st.world_size} GPUs x {accum} accumulation",
                       "tokens": f"{steps * total:,} in {steps} steps",
                       "data": f"{root}: train {len(train_shards)} shard(s) ({names(train_shards)}); "
                               f"val {len(val_shards)} ({names(val_shards)})"})
    finally:
        train_loader.close()
        val_loader.close()


if __name__ == "__main__":
    common.run(main)
