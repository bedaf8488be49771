"""Small models of many architectures, built offline from configs (random weights), with a forward.

Shared by the kernel tests: each entry is ``name -> (model, run)`` where ``run(model)`` calls the
model on a fixed small input.
"""

from __future__ import annotations

import torch

from compsearch.tasks.models import DigitsCNN, ResNet


def _ids(vocab: int = 99, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))


def _pixels(shape=(2, 3, 32, 32)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def build(name: str):
    import transformers as tf

    torch.manual_seed(0)
    ids, px = _ids(), _pixels()
    if name == "digits-cnn":
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        return DigitsCNN(), lambda m: m(x)
    if name == "mnist-resnet":
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        return ResNet((16, 32, 64), (2, 2, 2), stem_stride=2), lambda m: m(x)
    if name == "bert":
        config = tf.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128)  # fmt: skip
        return tf.BertForSequenceClassification(config), lambda m: m(input_ids=ids).logits
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=99, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                               bos_token_id=1, eos_token_id=2)  # fmt: skip
        return tf.GPT2LMHeadModel(config), lambda m: m(input_ids=ids).logits
    if name == "llama":
        config = tf.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                max_position_embeddings=64)  # fmt: skip
        return tf.LlamaForCausalLM(config), lambda m: m(input_ids=ids).logits
    if name == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip
        return tf.ViTForImageClassification(config), lambda m: m(pixel_values=px).logits
    if name == "clip":
        config = tf.CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=32, bos_token_id=1, eos_token_id=2),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=64,
                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            projection_dim=32,
        )  # fmt: skip
        return tf.CLIPModel(config), lambda m: m(input_ids=ids, pixel_values=px).logits_per_image
    if name == "resnet":
        config = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2],
                                 layer_type="basic", num_labels=10)  # fmt: skip
        return tf.ResNetForImageClassification(config), lambda m: m(pixel_values=px).logits
    if name == "mobilenetv2":
        config = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
        return tf.MobileNetV2ForImageClassification(config), lambda m: m(pixel_values=px).logits
    if name == "convnext":
        config = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 2],
                                   num_labels=10, image_size=32)  # fmt: skip
        return tf.ConvNextForImageClassification(config), lambda m: m(pixel_values=px).logits
    if name == "llava":
        return llava()
    if name in SEQ2SEQ:
        return _seq2seq(name, ids)
    return _decoder(name, ids)


def _decoder(name: str, ids: torch.Tensor):
    import transformers as tf

    common = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if name == "gemma":  # a scaled embedding (its own forward), a single key/value head
        config = tf.GemmaConfig(**common, intermediate_size=128, num_key_value_heads=1,
                                head_dim=16)  # fmt: skip
        model = tf.GemmaForCausalLM(config)
    elif name == "opt":  # a positional embedding with an offset, in its own forward
        config = tf.OPTConfig(**common, ffn_dim=128, max_position_embeddings=64,
                              word_embed_proj_dim=64)  # fmt: skip
        model = tf.OPTForCausalLM(config)
    elif name == "falcon":  # Linear's own forward computes input @ weight.T
        model = tf.FalconForCausalLM(tf.FalconConfig(**common))
    else:
        raise KeyError(name)
    return model, lambda m: m(input_ids=ids).logits


def _seq2seq(name: str, ids: torch.Tensor):
    import transformers as tf

    if name == "bart":  # scaled word and learned positional embeddings, both with own forwards
        config = tf.BartConfig(vocab_size=99, d_model=64, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=128, decoder_ffn_dim=128,
                               max_position_embeddings=64)  # fmt: skip
        model = tf.BartForConditionalGeneration(config)
    elif name == "t5":  # a per-head relative position bias, reused by every layer
        config = tf.T5Config(vocab_size=99, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)  # fmt: skip
        model = tf.T5ForConditionalGeneration(config)
    elif name == "whisper":  # audio: a Conv1d feature encoder, sinusoidal and learned positions
        config = tf.WhisperConfig(vocab_size=99, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                                  max_source_positions=16, max_target_positions=32,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=1)  # fmt: skip
        features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
        model = tf.WhisperForConditionalGeneration(config)
        return model, lambda m: m(input_features=features, decoder_input_ids=ids[:, :6]).logits
    else:
        raise KeyError(name)
    return model, lambda m: m(input_ids=ids, decoder_input_ids=ids[:, :6]).logits


def llava():
    import transformers as tf

    vision = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    text = dict(model_type="llama", vocab_size=120, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                max_position_embeddings=128)  # fmt: skip
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=119,
                            vision_feature_layer=-1, projector_hidden_act="gelu")  # fmt: skip
    model = tf.LlavaForConditionalGeneration(config)
    image_tokens = (32 // 8) ** 2 + 1  # patches + CLS with the "full" feature select strategy
    if config.vision_feature_select_strategy == "default":
        image_tokens -= 1
    prompt = torch.cat([torch.full((2, image_tokens), 119), _ids(110, (2, 6))], dim=1)
    px = _pixels()

    def run(m):
        return m(input_ids=prompt, pixel_values=px).logits

    return model, run


SEQ2SEQ = ("bart", "t5", "whisper")
NAMES = ["digits-cnn", "mnist-resnet", "bert", "gpt2", "llama", "vit", "clip", "resnet",
         "mobilenetv2", "convnext", "llava", "gemma", "opt", "falcon", "bart"]  # fmt: skip
