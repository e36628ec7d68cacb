"""Timesteps as every diffusion source takes them: steps of the model's noise schedule."""
import numbers
from typing import Optional, Tuple


def check_timesteps(timestep, denoising_from, num_steps: int, where: str = ''
                    ) -> Tuple[int, Optional[int]]:
    """``timestep`` (and ``denoising_from``, if any) as steps of the noise schedule."""
    for name, value in (('timestep', timestep), ('denoising_from', denoising_from)):
        if value is None and name == 'denoising_from':
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f'{where}{name} must be an integer in [0, {num_steps}) (a step of '
                             f'the noise schedule), got {value!r}.')
        if not 0 <= value < num_steps:
            raise ValueError(f'{where}{name} must be in [0, {num_steps}), got {value}.')
    if denoising_from is not None and denoising_from <= timestep:
        raise ValueError(f'{where}denoising_from ({denoising_from}) must be above timestep '
                         f'({timestep}): it is where denoising starts.')
    if denoising_from is not None and timestep == 0:
        raise ValueError(f'{where}denoising_from needs a timestep above 0: t = 0 is the clean '
                         'latent, which no denoising reaches.')
    return int(timestep), None if denoising_from is None else int(denoising_from)
