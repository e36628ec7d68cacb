# GATE's LoRA technique on diffusion transformers (SD3.x, FLUX.1): the paper's recipe (rank 64,
# lr 1e-4, 30 random training images at 512x512, about 100 epochs, empty captions) with the
# flow-matching objective of diffusers' train_dreambooth_lora_sd3.py /
# train_dreambooth_lora_flux.py (their timestep sampling, loss weighting, AdamW weight decay and
# gradient clipping) and their alpha = rank (scale 1: every loader reads the file alike, also
# those that ignore its metadata, as diffusers' SD3 script writes none). A transformer LoRA
# only: the DiT sources load no text-encoder LoRA.
_base_ = ['./_loop_.py']
model = 'stabilityai/stable-diffusion-3.5-medium'  # an SD3.x or FLUX.1 diffusers folder
rank = 64
alpha = 64
target_modules = None  # None: diffusers' scripts' targets for the family (DIT_TARGETS)
transformer_lr = 1e-4
weight_decay = 1e-4
max_grad_norm = 1.0  # None: no clipping
weighting_scheme = None  # None: SD3 'logit_normal', FLUX 'none' (uniform), as the scripts
logit_mean = 0.0
logit_std = 1.0
mode_scale = 1.29
precondition_outputs = False  # True: the SD3 script's default (compare x0 estimates)
guidance_scale = 3.5  # FLUX.1-dev's guidance embedding (models without one ignore it)
max_sequence_length = None  # T5 tokens; None: the pipeline's (SD3 256, FLUX 512), as the source
