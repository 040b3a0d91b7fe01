# config/t4_quick_test.py: the T4 guide's quick test (depth 8, 100 base steps) to check a machine first.
depth = 8
max_steps = 100
eval_every = 50
checkpoint_interval = 50
