"""HO-SFL fine-tuning of OPT-13B on SST-2 with MeZO's protocol, for comparison with MeZO (91.4) and full fine-tuning
(92.0) on OPT-13B (Malladi et al., 2023, Table 1). Needs a GPU: see "Memory" below.

    python recipes/opt13b_sst2.py                                    # facebook/opt-13b from the Hub
    python recipes/opt13b_sst2.py --model_name_or_path /models/opt-13b --load_in_4bit_client
    accelerate launch recipes/opt13b_sst2.py --gradient_checkpointing # 1 GPU; --num_processes N for N GPUs
    hosfl-hf opt13b-sst2 --sample_seed 13                            # the same through the console command

Defaults (recipe `opt13b-sst2` of `hosfl_hf.cli.RECIPES`; every one is a flag, see `--help`):

* the paper's method settings: 10 clients, 3 per round, P=2 perturbations, mu=1e-3, AdamW on both parts with
  learning rate 1e-5, LoRA r=8 / alpha=16 on q_proj and v_proj in both parts, prompts of at most 128 tokens;
* the server part in bfloat16 (`--dtype bfloat16 --bf16`), LoRA adapters in float32; the client blocks in 4-bit NF4
  with `--load_in_4bit_client` (off by default);
* split after block 10 of 40 (`--split_layer 10`): the client holds a quarter of the blocks (docs/faq.md);
* MeZO's SST-2 protocol (`--protocol mezo`): 1,000 training and 500 development examples drawn from the GLUE
  training set with `--sample_seed` (MeZO averages seeds 13, 21, 42, 87, 100), the 872 GLUE validation sentences as
  test set, and MeZO's prompt `"<sentence> It was"` with " terrible" / " great" (`--prompt mezo`);
* this recipe's own budget (not from the paper): batch 16 per client, 1,000 rounds, dev accuracy every 100 rounds.

Memory (estimated, not measured: no GPU was available when this recipe was written; `hosfl-hf memory --help`):
batch 16 x 128 tokens, split 10, one process holding the server and the round's clients: ~36 GiB in bf16, ~32 GiB
with 4-bit client blocks, ~25 / ~21 GiB with `--gradient_checkpointing`; add 1-2 GiB of CUDA context. An 80 GB GPU
runs the defaults; a 40-48 GB GPU with `--gradient_checkpointing`. See docs/recipes.md for the arithmetic.
"""

from hosfl_hf.cli import main, parse_recipe_args

if __name__ == "__main__":
    main(*parse_recipe_args("opt13b-sst2"))
