"""HO-SFL fine-tuning of the shipped SmolLM2-135M-Instruct on SST-2 or RTE, on CPU (the README's main job).

    python recipes/glue_cpu.py --config recipes/sst2_smollm2.yaml          # SST-2, 80 rounds (~10 min, 2 cores)
    python recipes/glue_cpu.py --config recipes/rte_smollm2.yaml           # RTE, 80 rounds
    python recipes/glue_cpu.py --config recipes/sst2_smollm2.yaml --max_steps 20 --eval_limit 256
    accelerate launch --cpu --num_processes 1 recipes/glue_cpu.py --config recipes/sst2_smollm2.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/glue_cpu.py --config recipes/sst2_smollm2.yaml
                                                   # 2 CPU processes (see docs/faq.md: `--cpu` launches only one)

Without `--config` the defaults are those of `recipes/sst2_smollm2.yaml` (recipe `sst2-smollm2` of
`hosfl_hf.cli.RECIPES`, also `hosfl-hf sst2-smollm2`): the paper's federation (10 clients, 3 per round, P=2,
mu=1e-3, LoRA r=8 / alpha=16 on q_proj and v_proj in both parts) with a CPU-sized batch (8), 80 rounds and learning
rates raised for that short budget (server 1e-3, client 1e-4). Every flag: `python recipes/glue_cpu.py --help`.
"""

from hosfl_hf.cli import main, parse_recipe_args

if __name__ == "__main__":
    main(*parse_recipe_args("sst2-smollm2"))
