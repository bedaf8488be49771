"""Small models of many architectures, built offline from configs (random weights), with a forward.

Shared by the kernel tests and ``benchmarks/zoo_matrix.py``: ``build(name)`` gives ``(model, run)``
where ``run(model)`` calls the model on a fixed small input; ``build(name, batch, length)`` the same
model (same seed) with inputs of another batch size and sequence length (image size for the CNNs).
``KIND[name]`` says what the model is for (``causal`` and ``seq2seq`` models can ``generate``).
"""

from __future__ import annotations

import torch

from compsearch.tasks.models import DigitsCNN, ResNet

VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)  # fmt: skip
DECODER = dict(TEXT, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip

# name -> (model class, config class, config, kind); kind: causal, seq2seq, encoder, image, audio
SPECS: dict[str, tuple[str, str, dict, str]] = {
    # encoders
    "bert": ("BertForSequenceClassification", "BertConfig", TEXT, "encoder"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(TEXT, max_position_embeddings=40, pad_token_id=1), "encoder"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128), "encoder"),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig",  # one layer shared by all
               dict(TEXT, embedding_size=32), "encoder"),
    "deberta-v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config",  # relative attention
                   dict(TEXT, relative_attention=True, position_buckets=8, max_relative_positions=16,
                        pos_att_type=["p2c", "c2p"]), "encoder"),
    # decoders
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
             n_positions=32, bos_token_id=1, eos_token_id=2), "causal"),
    "llama": ("LlamaForCausalLM", "LlamaConfig",  # RoPE, grouped-query attention
              dict(DECODER, num_attention_heads=8, num_key_value_heads=2), "causal"),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(DECODER, num_key_value_heads=2, sliding_window=8), "causal"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(DECODER, num_key_value_heads=2), "causal"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config",  # fused qkv and gate/up projections
             dict(DECODER, num_key_value_heads=2, pad_token_id=0), "causal"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig",  # a scaled embedding; a single key/value head
              dict(DECODER, num_key_value_heads=1, head_dim=16), "causal"),
    "opt": ("OPTForCausalLM", "OPTConfig",  # a positional embedding with an offset
            dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64), "causal"),
    "falcon": ("FalconForCausalLM", "FalconConfig",  # Linear computes input @ weight.T
               dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
               "causal"),
    "bloom": ("BloomForCausalLM", "BloomConfig",  # ALiBi, one fused qkv split three ways per head
              dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4), "causal"),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",  # parallel attention, chunked qkv
                 dict(TEXT, max_position_embeddings=64, use_parallel_residual=True), "causal"),
    "gptj": ("GPTJForCausalLM", "GPTJConfig",  # parallel attention and MLP
             dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
             "causal"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",  # mixture of experts
                dict(DECODER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                "causal"),
    "qwen2-moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",  # experts and a shared expert
                  dict(DECODER, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=64), "causal"),
    # encoder-decoders
    "bart": ("BartForConditionalGeneration", "BartConfig",  # scaled and positional embeddings
             dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, max_position_embeddings=64), "seq2seq"),
    "t5": ("T5ForConditionalGeneration", "T5Config",  # a per-head relative bias, shared by layers
           dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                num_heads=4, decoder_start_token_id=0), "seq2seq"),
    "whisper": ("WhisperForConditionalGeneration", "WhisperConfig",  # a Conv1d feature encoder
                dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                     max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1), "audio-seq2seq"),
    "wav2vec2": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config",  # conv features, grouped
                 dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2),
                      conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4, num_labels=10), "audio"),
    # vision
    "vit": ("ViTForImageClassification", "ViTConfig", VISION, "image"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", VISION, "image"),
    "swin": ("SwinForImageClassification", "SwinConfig",  # windowed attention, relative bias
             dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                  window_size=4, num_labels=10), "image"),
    "segformer": ("SegformerForImageClassification", "SegformerConfig",  # spatial reduction
                  dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
                       mlp_ratios=[2, 2], num_labels=10), "image"),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], layer_type="basic",
                    num_labels=10), "image"),
    "mobilenetv2": ("MobileNetV2ForImageClassification", "MobileNetV2Config",  # depthwise
                    dict(image_size=32, depth_multiplier=0.35, num_labels=10), "image"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10,
                      image_size=32), "image"),
    "regnet": ("RegNetForImageClassification", "RegNetConfig",  # grouped convolutions
               dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                    num_labels=10), "image"),
}  # fmt: skip
OWN = ("digits-cnn", "mnist-resnet", "clip", "llava", "llava-siglip")
KIND = {name: spec[3] for name, spec in SPECS.items()}
KIND.update({"digits-cnn": "image", "mnist-resnet": "image", "clip": "multimodal",
             "llava": "causal", "llava-siglip": "causal"})  # fmt: skip
ALL = [*OWN[:2], *SPECS, *OWN[2:]]


def _ids(vocab: int = VOCAB, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))


def _pixels(shape=(2, 3, 32, 32)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def build(name: str, batch: int = 2, length: int = 12):
    import transformers as tf

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name == "digits-cnn":
        x = torch.randn(batch * 2, 1, 8, 8, generator=generator)
        return DigitsCNN(), lambda m: m(x)
    if name == "mnist-resnet":
        side = 28 if length == 12 else 36
        x = torch.randn(batch * 2, 1, side, side, generator=generator)
        return ResNet((16, 32, 64), (2, 2, 2), stem_stride=2), lambda m: m(x)
    if name == "clip":
        return _clip(batch, length)
    if name.startswith("llava"):
        return llava(batch, length, siglip=name == "llava-siglip")
    model_class, config_class, config, kind = SPECS[name]
    model = getattr(tf, model_class)(getattr(tf, config_class)(**config))
    ids = _ids(shape=(batch, length))
    if kind in ("causal", "encoder"):
        return model, lambda m: m(input_ids=ids).logits
    if kind == "seq2seq":
        return model, lambda m: m(input_ids=ids, decoder_input_ids=ids[:, : length // 2]).logits
    if kind == "audio-seq2seq":
        features = torch.randn(batch, 16, 32, generator=generator)
        return model, lambda m: m(input_features=features, decoder_input_ids=ids[:, :6]).logits
    if kind == "audio":
        samples = torch.randn(batch, 400 + 20 * length, generator=generator)
        return model, lambda m: m(input_values=samples).logits
    cnn = name in ("resnet", "mobilenetv2", "convnext", "regnet")
    side = 40 if cnn and length != 12 else 32
    px = torch.randn(batch, 3, side, side, generator=generator)
    return model, lambda m: m(pixel_values=px).logits


def _clip(batch: int, length: int):
    import transformers as tf

    config = tf.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, bos_token_id=1, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32,
    )  # fmt: skip
    ids, px = _ids(shape=(batch, length)), _pixels((batch, 3, 32, 32))
    return tf.CLIPModel(config), lambda m: m(input_ids=ids, pixel_values=px).logits_per_image


def llava(batch: int = 2, length: int = 12, siglip: bool = False):
    """LLaVA: a vision tower (CLIP, or SigLIP without a class token), a projector, a Llama."""
    import transformers as tf

    vision = dict(model_type="siglip_vision_model" if siglip else "clip_vision_model",
                  image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    text = dict(model_type="llama", vocab_size=120, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                max_position_embeddings=128)  # fmt: skip
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=119,
                            vision_feature_layer=-1, projector_hidden_act="gelu")  # fmt: skip
    if siglip:
        config.vision_feature_select_strategy = "full"
    model = tf.LlavaForConditionalGeneration(config)
    image_tokens = (32 // 8) ** 2 + (0 if siglip else 1)  # patches (+ CLS with "full")
    if not siglip and config.vision_feature_select_strategy == "default":
        image_tokens -= 1
    prompt = torch.cat([torch.full((batch, image_tokens), 119), _ids(110, (batch, length // 2))], 1)
    px = _pixels((batch, 3, 32, 32))

    def run(m):
        return m(input_ids=prompt, pixel_values=px).logits

    return model, run


# the architectures every pruning test runs on (the others: see benchmarks/zoo_matrix.py)
NAMES = ["digits-cnn", "mnist-resnet", "bert", "gpt2", "llama", "vit", "clip", "resnet",
         "mobilenetv2", "convnext", "llava", "gemma", "opt", "falcon", "bart", "t5", "swin",
         "whisper", "mixtral"]  # fmt: skip
