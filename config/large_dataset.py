# config/large_dataset.py: base pretraining on a large corpus (10 M rows) with 12 GB of RAM on 3x RTX 3080 (20 GB),
# the large-dataset guide's TrainConfigPretrainLarge. Its --use_large_config=True is this file:
#   torchrun --standalone --nproc_per_node=3 train_base.py config/large_dataset.py --data_root=<folder of shards>
# Memory: shards are streamed a slice of rows at a time whatever their row-group size, so the guide's
# low-memory switches (ultra_low_mem, num_workers=0, no pin_memory, buffer size) have nothing to turn on here.
device_batch_size = 32         # the guide's batch_size_per_gpu
grad_accum_steps = 2           # effective batch = 32 x 3 GPUs x 2 = 192 sequences (36,864 tokens) per step
max_seq_len = 192
num_epochs = 3.0
max_lr = 1e-4                  # the guide's learning rate, for its AdamW recipe
optimizer = "adamw"            # the guide trains with AdamW; optimizer="muon" with the script's own lrs learns
                               # faster at equal tokens (BENCHMARKS.md), e.g. --optimizer=muon --max_lr=0.004
warmup_steps = 1024
checkpoint_interval = 5000     # the guide's save_steps
keep_best_n = 5                # the guide keeps the 5 best checkpoints
log_every = 100                # the guide's logging_steps
dtype = "auto"                 # bf16 on the 3080 (sm_86)
