"""Tiny random Helios model folders saved by the diffusers reference pipelines, and the reference itself."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "circle", "circles", "bouncing", "on", "background",
         "two", "cat", "dog", "running", "snow", "the", "fox", "bad", "blurry", "video", "of"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


# The transformer of the tiny model folders (diffusers' and our config take the same names).
TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
                        freq_dim=32, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4))


def tiny_components(kind: str, seed: int = 0):
    """kind: 'base' (HeliosScheduler, 1 stage), 'mid' (3 stages) or 'distilled' (DMD, 3 stages)."""
    from diffusers import AutoencoderKLWan, HeliosDMDScheduler, HeliosScheduler, HeliosTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                           num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = HeliosTransformer3DModel(**TINY_TRANSFORMER)
    with torch.no_grad():  # zero-initialised tables would hide modulation bugs
        for name, p in transformer.named_parameters():
            if "scale_shift_table" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if kind == "base":
        scheduler = HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True)
    elif kind == "mid":
        # gamma = 1/3 (the released value) makes the block-noise covariance singular; the reference's float32
        # Cholesky then fails on the CPU, so the tiny models use a nearby value.
        scheduler = HeliosScheduler(use_dynamic_shifting=True, gamma=0.25)
    elif kind == "distilled":
        scheduler = HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear", gamma=0.25)
    else:
        raise ValueError(kind)
    for module in (vae, text_encoder, transformer):  # constructed modules start in train mode (T5 dropout)
        module.eval()
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                tokenizer=tiny_tokenizer())


def reference_pipeline(kind: str, seed: int = 0):
    from diffusers import HeliosPipeline, HeliosPyramidPipeline

    comps = tiny_components(kind, seed)
    if kind == "base":
        return HeliosPipeline(**comps)
    return HeliosPyramidPipeline(**comps, is_cfg_zero_star=(kind == "mid"), is_distilled=(kind == "distilled"))


def save_model_folder(kind: str, folder: Path, seed: int = 0):
    """The reference pipeline's parts, each saved by its own library, in a folder our writer lays out
    (helios.model_folder.write_model_folder: the same model_index.json as diffusers' save_pretrained)."""
    import diffusers

    from helios.model_folder import PARTS, write_model_folder

    pipe = reference_pipeline(kind, seed)
    index = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__,
             **{k: list(v) if isinstance(v, tuple) else v for k, v in pipe.config.items() if not k.startswith("_")}}
    index = dict(sorted(index.items()))  # diffusers writes its keys sorted
    write_model_folder(folder, index, {name: getattr(pipe, name).save_pretrained for name in PARTS})
    return pipe


def contiguous_outputs(transformer) -> None:
    """The reference transformer can return a non-contiguous tensor, which its own CFG-Zero* code then
    `.view`s and fails on; making the output contiguous changes no value."""
    forward = transformer.forward

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].contiguous(), *out[1:])
        out.sample = out.sample.contiguous()
        return out

    transformer.forward = wrapped


def save_random_preview_decoder(path: Path, vae_config, seed: int = 0, widths=(16, 16, 8, 8)) -> Path:
    """A TAEHV-style decoder with random weights for a VAE config's latent space, saved as `helios
    train-decoder` saves one (safetensors, its architecture in the metadata)."""
    import math

    from safetensors.torch import save_file

    from helios.model.taehv import CONFIG_METADATA_KEY, TAEHV, TAEHVConfig

    ups = int(math.log2(vae_config.scale_factor_spatial))
    cfg = TAEHVConfig(latent_channels=vae_config.z_dim, widths=widths, blocks=1, encoder=False,
                      space_upscale=tuple(i >= 3 - ups for i in range(3)))
    torch.manual_seed(seed)
    save_file(dict(TAEHV(cfg).state_dict()), str(path), metadata={CONFIG_METADATA_KEY: cfg.to_json()})
    return path
