"""ringlwm.vision: images and videos in and out of LWM's vision-language model.

    python -m ringlwm.vision.preprocess --vqgan V --input videos/ --out codes.jsonl     # frames -> VQGAN codes
    torchrun --nproc_per_node=2 -m ringlwm.vision.generate chat|image|video ...       # vision chat, text-to-vision

    preprocess.py  LWM's frame preprocessing (images, uniformly sampled video frames), the VQGAN encoding and
                   the resumable pre-tokenization command that writes JSONL records for ``ringlwm.data``
    generate.py    vision chat and text-to-image/video with classifier-free guidance, sequence-parallel

The token format the loader trains on (257 tokens a frame, <vision> markers, vision masks) is
``ringlwm.data.vision_tokens``; this package imports it (and ``ringlwm.models.vqgan``), never the reverse.
"""
