# What every LoRA recipe shares (the UNet one, _base_.py; the DiT one, _base_dit_.py): the
# paper's 30 random training images at 512x512, about 100 epochs at batch 1, empty captions,
# a LoRA file every 500 steps.
num_images = 30
resolution = 512  # a multiple of the model's latent patch (8 for UNets, 16 for DiTs)
steps = 3000  # 100 epochs of 30 images at batch 1
batch_size = 1
save_every = 500
log_every = 50
caption = ''
captions = None  # or {file name: caption} / a JSON file of it (tags or sentences)
seed = 0
