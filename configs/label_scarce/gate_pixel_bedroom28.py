# Bedroom-28 (DDPM-segmentation's benchmark: 28 classes, background ignored) with the GATE
# authors' label-scarce variants: the fine-grained prompt; Canny ControlNet with a short
# prompt; one LoRA with the short prompt. Train the LoRA with
# `python tools/train_lora.py configs/lora/bedroom28.py`.
# DDPM-segmentation's ADM features beside them need its `lsun_bedroom.pt` in checkpoints/ddpm/
# (docs/label_scarce.md). Run the protocol with
# `python tools/label_scarce.py configs/label_scarce/gate_pixel_bedroom28.py --splits 5`.
_base_ = ['./_base_/gate_pixel.py']
num_classes = 28
dataset_type = 'Bedroom28Dataset'
data_root = 'datasets/bedroom_28'
model = dict(
    backbone=dict(
        source=dict(sources=dict(
            sd=dict(
                prompt='a photo of a tidy and well-designed bedroom',
                controlnets=dict(canny=dict(model='lllyasviel/sd-controlnet-canny',
                                            condition=dict(type='canny'))),
                loras=dict(a='work_dirs/lora/bedroom28/lora_step1500.safetensors'),
                variants=[
                    dict(),
                    dict(prompt='a bedroom', controlnets=dict(canny=1.0), denoising_from=60),
                    dict(prompt='a bedroom', lora='a'),
                ]),
            adm=dict(model='checkpoints/ddpm/lsun_bedroom.pt')))),
    decode_head=dict(num_classes=num_classes))
train_dataloader = dict(dataset=dict(type=dataset_type, data_root=data_root))
test_dataloader = dict(dataset=dict(type=dataset_type, data_root=data_root))
# experiments/bedroom_28/ddpm.json: training_number 40, testing_number 20.
fixed_split = dict(num_train=40, num_test=20)
max_iters = 2000  # about 100 epochs of the 40 training images
train_cfg = dict(max_iters=max_iters)
