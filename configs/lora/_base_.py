# The paper's LoRA recipe: LoCon-style (attention + convolutions), rank 64, alpha 32, UNet
# lr 1e-4, text encoder lr 5e-5 (its attention projections), 30 random training images,
# about 100 epochs, empty captions.
_base_ = ['./_loop_.py']
model = 'stable-diffusion-v1-5/stable-diffusion-v1-5'
rank = 64
alpha = 32
unet_lr = 1e-4
text_encoder_lr = 5e-5  # 0: UNet LoRA only
target_modules = ['to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'proj_out', 'ff.net.0.proj',
                  'ff.net.2', 'conv1', 'conv2', 'conv_shortcut', 'time_emb_proj']
