# Horse-21 (DDPM-segmentation's benchmark, 21 classes with background) with the GATE
# authors' label-scarce variants: the fine-grained prompt; Canny ControlNet with a short
# prompt; two LoRAs (moderate and slightly overfit) with the short prompt. Train the LoRAs
# with `python tools/train_lora.py configs/lora/horse21.py`.
# DDPM-segmentation's ADM features beside them need its `lsun_horse.pt` in checkpoints/ddpm/
# (docs/label_scarce.md). Run the protocol with
# `python tools/label_scarce.py configs/label_scarce/gate_pixel_horse21.py --splits 5`.
_base_ = ['./_base_/gate_pixel.py']
num_classes = 21
model = dict(
    backbone=dict(
        source=dict(sources=dict(
            sd=dict(
                prompt='a horse, high quality, best quality, highly realistic, masterpiece',
                controlnets=dict(canny=dict(model='lllyasviel/sd-controlnet-canny',
                                            condition=dict(type='canny'))),
                loras=dict(a='work_dirs/lora/horse21/lora_step1500.safetensors',
                           b='work_dirs/lora/horse21/lora_step3000.safetensors'),
                variants=[
                    dict(),
                    dict(prompt='a horse', controlnets=dict(canny=1.0), denoising_from=60),
                    dict(prompt='a horse', lora='a'),
                    dict(prompt='a horse', lora='b'),
                ]),
            adm=dict(model='checkpoints/ddpm/lsun_horse.pt')))),
    decode_head=dict(num_classes=num_classes))
