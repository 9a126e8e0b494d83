"""Pydantic schemas for catalog entries. Field names follow Hugging Face ``config.json``.

Units live in field names (``memory_mib``, ``hbm_bandwidth_gbps``) and are converted
to bytes once, by properties on the schema.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A JSON/YAML ``true`` is not a size or a count (pydantic would read it as 1)."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class Family(StrEnum):
    """Module layout of the Hugging Face implementation (decides tensor names and shapes)."""

    LLAMA = "llama"          # Llama 1/2/3, Mistral, Qwen2/2.5 (biases on q,k,v), Qwen3 (q/k norm)
    GEMMA2 = "gemma2"        # four norms per layer, tied embeddings
    PHI3 = "phi3"            # fused qkv_proj and gate_up_proj
    MIXTRAL = "mixtral"      # block_sparse_moe with w1/w2/w3 experts
    QWEN3_MOE = "qwen3_moe"  # mlp.experts.N.{gate,up,down}_proj, q/k norm
    DEEPSEEK = "deepseek"    # DeepSeek-V2/V3: MLA attention, shared + routed experts
    GPT2 = "gpt2"            # Conv1D c_attn/c_proj/c_fc, learned positions
    OPT = "opt"              # learned positions with offset 2, biases, fc1/fc2
    FALCON = "falcon"        # fused query_key_value, parallel attention, MQA / GQA (new_decoder_architecture)
    GEMMA = "gemma"          # Gemma 1: Llama layout, Gemma RMSNorm (1 + w), scaled embeddings, tied
    GEMMA3 = "gemma3"        # Gemma-2 layout plus q/k RMSNorms; sliding layers from layer_types
    PHI = "phi"              # Phi-1/1.5/2: biased q/k/v/dense, one LayerNorm, parallel fc1/fc2 MLP, biased lm_head
    QWEN2_MOE = "qwen2_moe"  # Qwen1.5/2-MoE: routed experts plus a gated shared expert
    GPT_NEOX = "gpt_neox"    # Pythia / GPT-NeoX: fused query_key_value, two LayerNorms, parallel residual
    GPTJ = "gptj"            # GPT-J: one LayerNorm, parallel attention and fc_in/fc_out MLP, biased lm_head
    GPT_BIGCODE = "gpt_bigcode"  # StarCoder / SantaCoder: GPT-2 layout with nn.Linear and multi-query c_attn
    BLOOM = "bloom"          # ALiBi, fused query_key_value, a LayerNorm after the embedding
    STABLELM = "stablelm"    # StableLM: LayerNorms, gated MLP, optional q/k per-head LayerNorms and parallel residual
    OLMO2 = "olmo2"          # OLMo-2: post-norms only, q/k RMSNorms over all heads
    GRANITE = "granite"      # Granite: Llama layout with scalar multipliers; attention_bias on q, k, v, o
    COHERE = "cohere"        # Command-R: bias-free LayerNorm, parallel attention and MLP, optional q/k norms
    PARAMS_ONLY = "params_only"  # known only by its parameter count (papers' hypothetical sizes)


MAX_LAYERS = 10_000
"""Most layers a model may have. memplan builds one record per layer (about 0.1 ms each); published
LLMs have at most a few hundred (Llama-3.1-405B: 126), so 10,000 only refuses absurd input."""


MAX_SIZE = 2**50
"""Largest dimension a model field may hold (hidden size, vocabulary, experts...: 2^50 is about 10^15, far
beyond any model); larger numbers only overflow the arithmetic. Parameter counts have units.MAX_COUNT."""


_TEXT_FIELDS = frozenset({"name", "source", "family", "hidden_act", "norm", "topk_method", "layer_types"})
"""ModelSpec fields that hold text; every other field is a number or a flag."""


class ModelSpec(Strict):
    """A transformer's shape, in the vocabulary of Hugging Face ``config.json``."""

    name: str
    source: str = Field(description="Where the numbers come from (HF config URL, paper).")
    family: Family
    published_params: PositiveInt | None = Field(
        default=None, description="Parameter count as published (model card / paper)."
    )
    hidden_size: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    num_hidden_layers: PositiveInt | None = None
    num_attention_heads: PositiveInt | None = None
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    vocab_size: PositiveInt | None = None
    max_position_embeddings: PositiveInt | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    mlp_gated: bool = True
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Parallel blocks (GPT-J, GPT-NeoX use_parallel_residual, Falcon parallel_attn, Phi, Cohere, StableLM
    # use_parallel_residual): attention and MLP both read the block input; ``parallel_norms`` LayerNorms
    # feed them (Falcon's new_decoder_architecture: 2, ln_attn and ln_mlp; otherwise 1).
    parallel_attn: bool = False
    parallel_norms: int = Field(default=1, ge=1, le=2)
    # Partial rotary (Phi, GPT-NeoX, GPT-J, StableLM): the first ``rotary_dim`` dims of each q/k head are
    # rotated, the rest pass through; None: all of them (or no rotary: ALiBi, learned positions).
    rotary_dim: PositiveInt | None = None
    # ALiBi position biases instead of rotary embeddings (BLOOM, Falcon with alibi: true).
    alibi: bool = False
    # Sliding window: `sliding_window` tokens on layers marked "sliding_attention".
    sliding_window: PositiveInt | None = None
    layer_types: tuple[Literal["full_attention", "sliding_attention"], ...] | None = None
    # Mixture of experts.
    num_experts: PositiveInt | None = None
    num_experts_per_tok: PositiveInt | None = None
    moe_intermediate_size: PositiveInt | None = None
    n_shared_experts: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: PositiveInt | None = None
    first_k_dense_replace: int = Field(default=0, ge=0)
    # DeepSeek router: "noaux_tc" (V3) adds a per-expert e_score_correction_bias tensor;
    # "greedy" / "group_limited_greedy" (V2) do not.
    topk_method: str | None = None
    # Multi-head latent attention (DeepSeek-V2/V3).
    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None
    num_nextn_predict_layers: int = Field(default=0, ge=0)
    # Largest single layer, for ZeRO-3's live-parameter buffer when dimensions are unknown.
    largest_layer_params: PositiveInt | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_string_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``"4096"`` or ``"false"`` in a config.json is a string: transformers would keep it as one (and a
        non-empty string is true), so it is refused rather than converted (pydantic's lax mode would)."""
        if isinstance(value, str) and info.field_name not in _TEXT_FIELDS:
            wanted = "true or false" if cls.model_fields[info.field_name or ""].annotation is bool else "a number"
            raise ValueError(f"expected {wanted}, got the string {value!r}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _not_astronomical(cls, value: Any, info: ValidationInfo) -> Any:
        """A size or count beyond MAX_SIZE is a typo or a fuzzed file; refused before any arithmetic."""
        counts = info.field_name in ("published_params", "largest_layer_params")  # bounded by units.MAX_COUNT
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIZE and not counts:
            raise ValueError(f"is larger than 2^{MAX_SIZE.bit_length() - 1}, far beyond any real model")
        return value

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads or 1

    @property
    def dim_per_head(self) -> int:
        if self.head_dim:
            return self.head_dim
        if self.hidden_size and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return 0

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSpec:
        if self.family is Family.PARAMS_ONLY:
            if self.published_params is None:
                raise ValueError("a params-only model needs published_params")
            return self
        missing = [
            f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if getattr(self, f) is None
        ]
        if missing:
            raise ValueError(f"missing required field(s): {', '.join(missing)}")
        for layers_field in ("num_hidden_layers", "num_nextn_predict_layers"):
            if (getattr(self, layers_field) or 0) > MAX_LAYERS:
                raise ValueError(f"{layers_field} is {getattr(self, layers_field)}; memplan builds layers one by one "
                                 f"and accepts at most {MAX_LAYERS:,}")
        heads, kv = self.num_attention_heads or 1, self.kv_heads
        if heads % kv:
            raise ValueError(f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})")
        if not self.is_mla and self.dim_per_head == 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) is smaller than num_attention_heads ({heads}), "
                             "so each head would have 0 dimensions; set head_dim")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.num_experts and not self.num_experts_per_tok:
            raise ValueError("num_experts_per_tok is required when num_experts is set")
        if self.num_experts_per_tok and self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_experts")
        return self


class GpuSpec(Strict):
    """One accelerator, with memory as the driver reports it (nvidia-smi / rocm-smi total)."""

    name: str
    aliases: tuple[str, ...] = ()
    vendor: Literal["nvidia", "amd"]
    source: str
    memory_mib: PositiveInt = Field(description="Total memory as the driver reports it, in MiB (2^20 bytes).")
    cuda_memory_mib: PositiveInt | None = Field(
        default=None, description="Total memory the CUDA runtime reports (cudaMemGetInfo, torch total_memory), "
        "in MiB; below nvidia-smi's total by what the driver keeps. None: no published figure; the capacity then "
        "follows memplan.catalog.capacity's rule.")
    cuda_memory_quote: str | None = Field(default=None, description="The published line cuda_memory_mib comes from.")
    cuda_memory_url: str | None = Field(default=None, description="Where cuda_memory_quote was published.")
    cuda_memory_note: str | None = Field(
        default=None, description="How cuda_memory_mib follows from the quote: its precision, rounding taken down.")
    marketed_memory_gb: PositiveInt = Field(description="The box's number, e.g. 80 for an 'H100 80GB'.")
    bf16_dense_tflops: float = Field(gt=0, description="Peak dense bf16/fp16 tensor FLOP/s, in 10^12.")
    fp8_dense_tflops: float | None = Field(default=None, gt=0)
    hbm_bandwidth_gbps: float = Field(gt=0, description="Memory bandwidth in GB/s (10^9 bytes/s).")
    interconnect_gbps: float = Field(
        gt=0, description="GPU-to-GPU bandwidth per direction in GB/s (NVLink, Infinity Fabric or PCIe)."
    )
    pcie_gen: Literal[3, 4, 5, 6]
    price_per_hour_usd: float | None = Field(default=None, ge=0, description="Typical on-demand cloud price.")
    supports_bf16: bool = True
    supports_fp8: bool = False

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20

    @property
    def cuda_memory_bytes(self) -> int:
        """Bytes ``torch.cuda.mem_get_info()`` calls total: ``cuda_memory_mib`` where measured, else ``memory_bytes``."""
        return (self.cuda_memory_mib or self.memory_mib) * 2**20

    @property
    def capacity_bytes(self) -> int:
        """The bytes every engine budgets from: the CUDA runtime's total (``memplan.catalog.capacity``)."""
        from memplan.catalog.capacity import gpu_capacity

        return gpu_capacity(self).bytes

    @property
    def capacity_source(self) -> str:
        """Where ``capacity_bytes`` comes from, in words (``memplan.catalog.capacity``)."""
        from memplan.catalog.capacity import gpu_capacity

        return gpu_capacity(self).source

    @model_validator(mode="after")
    def _cuda_total_sourced(self) -> GpuSpec:
        if self.cuda_memory_mib is not None and self.cuda_memory_mib > self.memory_mib:
            raise ValueError(f"cuda_memory_mib ({self.cuda_memory_mib}) cannot exceed memory_mib ({self.memory_mib})")
        return self

    @property
    def calibration(self) -> dict[str, Any] | None:
        """This GPU model's ``memplan calibrate`` profile (``catalog.profiles.load_profile`` of its name), or
        None. The memory model reads the profile through this property, not the name, so a sweep can tell
        that GPUs without profiles share every byte (``memplan.vector_probe``)."""
        from memplan.catalog.profiles import load_profile

        return load_profile(self.name)


class HostSpec(Strict):
    """The host that a node's GPUs share: CPU RAM, NVMe and PCIe links. Sizes in bytes."""

    cpu_ram_bytes: int = Field(default=1024 * 2**30, gt=0, description="CPU RAM per node.")
    nvme_bytes: int = Field(default=0, ge=0, description="NVMe capacity usable for offload, per node.")
    nvme_read_gbps: float = Field(default=25.0, gt=0, description="Aggregate NVMe read bandwidth per node, GB/s.")
    nvme_write_gbps: float = Field(default=20.0, gt=0, description="Aggregate NVMe write bandwidth per node, GB/s.")
    pcie_gbps_per_gpu: float | None = Field(
        default=None, gt=0, description="Host-to-device bandwidth per GPU, GB/s; default from the PCIe generation."
    )


PCIE_GBPS_X16 = {3: 16.0, 4: 32.0, 5: 64.0, 6: 128.0}
"""Unidirectional bandwidth of a x16 link in GB/s, by PCIe generation (PCI-SIG spec, rounded)."""
