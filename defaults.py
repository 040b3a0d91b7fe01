"""defaults.py: the settings every stage script shares, and their defaults.

Trainer(globals(), ...) adds each of these to a stage script's globals unless the script declares the name
itself (then the script's value wins), so --key=value, config files, -h and the saved config treat them exactly
like the script's own keys. A stage script holds only what differs per stage: change a default for one stage by
declaring the key again at the top of its script, for every stage here.
"""
# schedule and optimizer
lr_scheduler = "cosine"       # cosine | linear | constant | cosine_with_restarts | wsd (warmup, stable, warmdown)
lr_restarts = 1               # cycles of cosine_with_restarts
warmdown_ratio = 0.65         # wsd: the last fraction of the steps, where the rate falls linearly to the final one
final_lr_frac = -1.0          # final learning rate as a fraction of the peak (nanochat's name); -1 = use min_lr
decay_lr = True               # False = constant after warmup
muon_momentum = 0.95          # Muon's momentum (after its warm-up)
muon_momentum_start = -1.0    # momentum at step 0, rising linearly to muon_momentum; -1 = no warm-up
muon_momentum_warmup_steps = 0  # steps of that rise
muon_momentum_warmdown = -1.0  # wsd: momentum at the end of the warmdown (linear); -1 = unchanged
weight_decay_schedule = "constant"  # weight_decay over the run: constant | linear | cosine (both end at 0)
weight_decay_horizon = -1     # the steps weight_decay was tuned for: a longer run gets weight_decay * this / max_steps,
                              # the same total decay (nanochat's T_epoch rule); -1 = off; yields to a --weight_decay
cautious_weight_decay = False  # Muon: decay a weight only where the update also shrinks it
lr_scaling = "none"           # none | linear | sqrt: scale max_lr with the global batch (the multi-GPU guide)
grad_clip = 1.0               # clip the global gradient norm; 0 = off
max_nonfinite = 10            # stop after this many non-finite losses in a row
# logging
log_every = 1                 # steps between log lines
log_gradients = False         # add per-layer gradient norms to the metrics
log_dir = ""                  # train.log + metrics.jsonl; "" = the run's checkpoint folder
wandb_log = False             # log to Weights & Biases (WANDB_MODE=offline works)
wandb_project = "t4chat"
# checkpoints and resume
keep_last_n_checkpoints = 5   # rotation: keep this many newest; -1 = keep all
permanent_checkpoints = ""    # steps never deleted, e.g. "10000,20000" (the nano-gpt guide's form)
keep_best_n = 0               # also keep the n checkpoints with the lowest val loss (all are then evaluated)
auto_resume = False           # continue from the newest complete checkpoint of this run
resume = False                # continue from checkpoint_path (--resume=<path> sets both)
checkpoint_path = ""          # the checkpoint to resume (a ckpt_*.pt or a run folder)
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/<the stage's folder>/<run_name>
run_name = ""                 # "" = the name of the run it starts from (base: d<depth>)
# before training
preflight = False             # print memory per device and run time for these settings on --gpu, then exit
gpu = ""                      # preflight's GPU: T4, 4xT4, RTX3080_20GB, RTX4060_8GB, A100_40GB... ("" = this one)
# runtime
tokenizer = ""                # "" = the one the checkpoint it starts from recorded (base: gpt2); a path must match it
device = "auto"               # auto | cpu | cuda | cuda:N
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16+GradScaler below, fp32 on CPU) | float32|float16|bfloat16
compile = None                # torch.compile; None = auto (CUDA sm>=7.0, not Windows)
gradient_checkpointing = False  # recompute activations in backward: less memory, ~30% more compute
peak_flops = None             # peak FLOP/s of one GPU for MFU when it is not in our table
_types = {"compile": bool, "peak_flops": float}
