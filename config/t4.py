# config/t4.py: 4x T4 (16 GB each, sm_75) base pretraining, the T4 guide's settings.
# python train_base.py config/t4.py        torchrun --standalone --nproc_per_node=4 train_base.py config/t4.py
depth = 12
max_seq_len = 1024
device_batch_size = 4          # 2 if you run out of memory (accumulation doubles, the global batch stays)
total_batch_size = 131072      # tokens per optimizer step over all 4 GPUs = 4 x 1024 x 4 x 8 accumulation
eval_every = 100
dtype = "auto"                 # T4 has no bf16 hardware: auto picks float16 + GradScaler
