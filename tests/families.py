"""Tiny random models of many transformers families, and inputs for their forward.

Each entry is built from the family's own config class (no download), saved with
``save_pretrained`` (so the stored tensor names are the ones transformers writes, which for
some families differ from the module names), and driven with inputs of the right kind:
token ids, ids plus decoder ids, or pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import transformers

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
DECODER = dict(SMALL, num_key_value_heads=2)
BART_LIKE = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
T5_LIKE = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)


@dataclass(frozen=True)
class Family:
    """One family: its config class and kwargs, the model class, what its forward takes, and what it shows."""

    name: str
    model_class: str
    config: dict
    inputs: str = "ids"  # "ids" | "seq2seq" | "pixels"
    note: str = ""
    moe: bool = False
    extra: dict = field(default_factory=dict)

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        cfg = transformers.AutoConfig.for_model(self.name, **self.config)
        model = getattr(transformers, self.model_class)(cfg).eval()
        unsaved = getattr(model, "_keys_to_ignore_on_save", None) or ()  # computed on load (sinusoidal tables)
        with torch.no_grad():  # off init, so no weight is exactly zero or identity
            for name, p in model.named_parameters():
                if not any(re.search(pattern, name) for pattern in unsaved):
                    p.add_(torch.randn_like(p) * 0.02)
        return model

    def example_inputs(self, model, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        cfg = model.config
        if self.inputs == "pixels":
            size, ch = cfg.image_size, cfg.num_channels
            return {"pixel_values": torch.randn(batch, ch, size, size, generator=g)}
        vocab = cfg.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.inputs == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, vocab, (batch, seq - 2), generator=g)
        return out


def _f(name, model_class, config, **kw) -> Family:
    return Family(name, model_class, config, **kw)


FAMILIES = [
    # decoder-only
    _f("llama", "LlamaForCausalLM", DECODER),
    _f("mistral", "MistralForCausalLM", dict(DECODER, sliding_window=None)),
    _f("qwen2", "Qwen2ForCausalLM", DECODER, note="q/k/v biases"),
    _f("qwen3", "Qwen3ForCausalLM", dict(DECODER, head_dim=8), note="q/k norms"),
    _f("gemma2", "Gemma2ForCausalLM", dict(DECODER, head_dim=8), note="soft-capping, sandwich norms"),
    _f("phi3", "Phi3ForCausalLM", dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
       note="fused qkv and gate_up"),
    _f("gpt2", "GPT2LMHeadModel", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2), note="Conv1D stores [in, out]"),
    _f("gpt_neox", "GPTNeoXForCausalLM", SMALL, note="stored names differ from module names"),
    _f("opt", "OPTForCausalLM", dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)),
    _f("falcon", "FalconForCausalLM", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4), note="fused query_key_value"),
    _f("gemma", "GemmaForCausalLM", dict(DECODER, head_dim=8), note="(1 + w) norms, scaled embeddings"),
    _f("gemma3_text", "Gemma3ForCausalLM", dict(DECODER, head_dim=8, sliding_window=4,
                                                 layer_types=["sliding_attention", "full_attention"]),
       note="sliding and full attention layers alternate"),
    _f("cohere", "CohereForCausalLM", DECODER, note="parallel attention and MLP, layer norm"),
    _f("cohere2", "Cohere2ForCausalLM", dict(DECODER, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"]),
       note="sliding windows on some layers"),
    _f("stablelm", "StableLmForCausalLM", dict(DECODER, partial_rotary_factor=0.5), note="partial rotary"),
    _f("starcoder2", "Starcoder2ForCausalLM", dict(DECODER, sliding_window=None), note="biases, GELU MLP"),
    _f("olmo2", "Olmo2ForCausalLM", DECODER, note="q/k norms after the projections"),
    _f("granite", "GraniteForCausalLM", dict(DECODER, embedding_multiplier=2.0, residual_multiplier=0.5,
                                             attention_multiplier=0.5, logits_scaling=2.0), note="multipliers"),
    _f("phi", "PhiForCausalLM", dict(SMALL, partial_rotary_factor=0.5), note="dense, partial rotary, biases"),
    _f("gptj", "GPTJForCausalLM", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       rotary_dim=4, bos_token_id=1, eos_token_id=2), note="interleaved rotary"),
    _f("bloom", "BloomForCausalLM", dict(vocab_size=96, hidden_size=32, n_layer=2, n_head=4,
                                         bos_token_id=1, eos_token_id=2), note="ALiBi, fused query_key_value"),
    _f("gpt_bigcode", "GPTBigCodeForCausalLM", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                    bos_token_id=1, eos_token_id=2), note="multi-query attention"),
    _f("persimmon", "PersimmonForCausalLM", DECODER, note="q/k layer norms, partial rotary; no GQA in its cache"),
    _f("biogpt", "BioGptForCausalLM", DECODER, note="scaled learned positions; no GQA in its cache"),
    _f("codegen", "CodeGenForCausalLM", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             rotary_dim=4), note="fused q/k/v; config without pad_token_id"),
    _f("xglm", "XGLMForCausalLM", dict(vocab_size=96, d_model=32, num_layers=2, attention_heads=4, ffn_dim=48,
                                       max_position_embeddings=64), note="sinusoidal positions"),
    _f("mpt", "MptForCausalLM", dict(d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=64),
       note="ALiBi"),
    _f("lfm2", "Lfm2ForCausalLM", dict(DECODER, layer_types=["conv", "full_attention"]),
       note="convolution and attention layers"),
    _f("recurrent_gemma", "RecurrentGemmaForCausalLM", dict(DECODER, head_dim=8, lru_width=32, attention_window_size=4,
                                                             block_types=["recurrent", "attention"]),
       note="recurrent and local-attention blocks"),
    _f("mamba", "MambaForCausalLM", dict(vocab_size=96, hidden_size=32, state_size=4, num_hidden_layers=2,
                                         expand=2, conv_kernel=4), note="state-space layers, no attention"),
    # encoder-only
    _f("bert", "BertModel", SMALL),
    _f("roberta", "RobertaModel", dict(SMALL, pad_token_id=1)),
    _f("distilbert", "DistilBertModel", dict(vocab_size=96, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                                             max_position_embeddings=64)),
    _f("deberta-v2", "DebertaV2Model", SMALL, note="relative attention"),
    _f("electra", "ElectraModel", dict(SMALL, embedding_size=16), note="embedding projection"),
    _f("albert", "AlbertModel", dict(SMALL, embedding_size=16, num_hidden_groups=1),
       note="one layer's weights shared by every layer"),
    _f("xlm-roberta", "XLMRobertaModel", dict(SMALL, pad_token_id=1)),
    _f("mpnet", "MPNetModel", dict(SMALL, pad_token_id=1), note="relative position buckets"),
    _f("roformer", "RoFormerModel", dict(SMALL, embedding_size=32), note="rotary encoder"),
    # encoder-decoder
    _f("t5", "T5ForConditionalGeneration", T5_LIKE, inputs="seq2seq", note="reads .weight of its projections"),
    _f("bart", "BartForConditionalGeneration", BART_LIKE, inputs="seq2seq"),
    _f("mt5", "MT5ForConditionalGeneration", T5_LIKE, inputs="seq2seq", note="gated feed-forward"),
    _f("pegasus", "PegasusForConditionalGeneration", BART_LIKE, inputs="seq2seq",
       note="sinusoidal positions, computed"),
    _f("marian", "MarianMTModel", dict(BART_LIKE, pad_token_id=0, decoder_start_token_id=0), inputs="seq2seq"),
    _f("mbart", "MBartForConditionalGeneration", BART_LIKE, inputs="seq2seq",
       note="pre-norm, embedding layer norm"),
    _f("m2m_100", "M2M100ForConditionalGeneration", BART_LIKE, inputs="seq2seq",
       note="sinusoidal table bounds the positions"),
    _f("umt5", "UMT5ForConditionalGeneration", T5_LIKE, inputs="seq2seq", note="relative bias in every layer"),
    _f("fsmt", "FSMTForConditionalGeneration",
       dict(BART_LIKE, src_vocab_size=96, tgt_vocab_size=96, langs=["en", "de"]), inputs="seq2seq",
       note="[sequence, batch] layers"),
    _f("led", "LEDForConditionalGeneration",
       dict(BART_LIKE, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, attention_window=4),
       inputs="seq2seq", note="windowed [sequence, batch] encoder attention"),
    _f("switch_transformers", "SwitchTransformersForConditionalGeneration",
       dict(T5_LIKE, num_experts=4, expert_capacity=8, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
       inputs="seq2seq", moe=True, note="experts as modules"),
    # vision transformers
    _f("vit", "ViTModel", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=4), inputs="pixels"),
    _f("clip_vision_model", "CLIPVisionModel", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=16, patch_size=4),
       inputs="pixels"),
    _f("deit", "DeiTModel", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=16, patch_size=4), inputs="pixels", note="distillation token"),
    _f("dinov2", "Dinov2Model", dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=16, patch_size=4), inputs="pixels", note="layer scale"),
    _f("siglip_vision_model", "SiglipVisionModel", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=16, patch_size=4),
       inputs="pixels"),
    # sparse mixture-of-experts decoders (experts stored as one 3-D tensor per layer in the modules)
    _f("gpt_oss", "GptOssForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                            sliding_window=4), moe=True, note="attention sinks, expert biases"),
    _f("deepseek_v3", "DeepseekV3ForCausalLM",
       dict(DECODER, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=16, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1), moe=True,
       note="multi-latent attention, grouped expert choice"),
    _f("jamba", "JambaForCausalLM", dict(DECODER, num_experts=2, expert_layer_period=2, attn_layer_period=2,
                                         attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2,
                                         use_mamba_kernels=False), moe=True, note="state-space and attention layers"),
    _f("mixtral", "MixtralForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2,
                                             sliding_window=None), moe=True),
    _f("qwen2_moe", "Qwen2MoeForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                decoder_sparse_step=1), moe=True, note="plus a shared expert"),
    _f("qwen3_moe", "Qwen3MoeForCausalLM", dict(DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=24, decoder_sparse_step=1), moe=True),
    _f("olmoe", "OlmoeForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2), moe=True),
    _f("granitemoe", "GraniteMoeForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2), moe=True,
       note="experts stored as fused input/output linears"),
    _f("phimoe", "PhimoeForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2), moe=True),
]
BY_NAME = {f.name: f for f in FAMILIES}
