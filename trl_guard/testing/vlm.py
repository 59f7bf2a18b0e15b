"""A tiny vision-language model to serve in tests of the VLM judge, built from configs (no download)."""

from __future__ import annotations

import torch

from . import tiny_qwen2_tokenizer

#: A chat template with no role markers and no generation prompt: the model's input ends with the question's last
#: token, which `build_tiny_llava`'s model repeats.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- else -%}<image>{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def build_tiny_llava(folder: str, seed: int = 0) -> str:
    """Write a `LlavaForConditionalGeneration` that `transformers serve` runs on a CPU in a fraction of a second, with
    its processor, to `folder`: a 1-layer CLIP vision tower on 32-pixel images (8-pixel patches) and a 1-layer Qwen2
    text model over `tiny_qwen2_tokenizer`, with no torchvision.

    Its answers are known in advance: the text layer's attention and MLP outputs are zero, so each position's hidden
    state is its token's embedding, and each digit's embedding is a one-hot vector that the tied output layer maps
    back to that digit. Under greedy decoding, a prompt that ends with a digit is answered with that digit, whatever
    the image; a judge's question ending in a dataset column therefore scores each image by that column.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    hidden = 64
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.normal_(0.0, 0.02)
        for digit in range(10):
            token = tokenizer.convert_tokens_to_ids(str(digit))
            embeddings[token] = 0.0
            embeddings[token, digit] = 1.0
        model.get_output_embeddings().weight.copy_(embeddings)
        layer = model.model.language_model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder
