# GATE on FLUX.1-dev with ControlNet guidance (our extension; the paper guides SD1.5 only):
# the prompt-only variant of gate_upernet_ade20k_flux.py beside the same prompt with
# InstantX's FLUX Canny ControlNet (a FluxControlNetModel on the packed condition latent;
# `hf download InstantX/FLUX.1-dev-Controlnet-Canny --local-dir checkpoints/flux-canny`),
# amalgamated per pixel by the learned weights as for SD. Both variants run as one transformer
# batch; the ControlNet runs once. Measure first whether the ControlNet suppresses content
# shift at this block: python tools/content_shift.py configs/gate_upernet_ade20k_flux_canny.py
# IMAGES --timesteps 50 200.
_base_ = ['./gate_upernet_ade20k_flux.py']
model = dict(
    backbone=dict(
        source=dict(
            controlnets=dict(canny=dict(model='InstantX/FLUX.1-dev-Controlnet-Canny',
                                        condition=dict(type='canny'))),
            variants=[dict(), dict(controlnets=dict(canny=1.0))])))
