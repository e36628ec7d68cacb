"""mmseg_gate: GATE diffusion-feature backbone for MMSegmentation 1.x.

These are compatible ranges for installing into an environment of your own; their upper bounds
stop at the newest versions tested. ``tools/install.sh`` installs the exact, verified set of
``requirements/lock.txt`` instead (docs/installation.md: "What gets installed"). torch and mmcv
are installed first there: mmcv 2.1.0 is a source build compiled against the torch already
present.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'torch>=2.6,<2.14',
    'torchvision>=0.16,<0.29',
    'mmcv>=2.0.0rc4,<2.2.0',
    'mmengine>=0.10.4,<0.11',
    'mmsegmentation>=1.2.2,<1.3',
    # Features come from diffusers' own UNet forward (tests compare it with the full
    # forward); 0.42 is the newest release, the bound stops at what the tests have run on.
    'diffusers>=0.32,<0.43',
    # 5.23 (locked) and 5.24 tested; GATE does not use transformers' PEFT integration.
    'transformers>=4.56,<5.25',
    'peft>=0.14,<0.22',
    'controlnet-aux>=0.0.9,<0.1',
    'safetensors>=0.4',
    # mmcv 2.1 and mmseg 1.2 are built and tested against OpenCV 4; controlnet-aux pulls the
    # headless build, which shares the cv2 module: keep both on the same major version.
    'opencv-python>=4.10,<5',
    'opencv-python-headless>=4.10,<5',
    'numpy>=1.24',
    # mmseg 1.2.2 imports these without declaring them.
    'ftfy>=6.1',
    'regex>=2023.0',
    # mmseg's CityscapesMetric needs it, even in format_only mode.
    'cityscapesscripts>=2.2',
    # mmcv's build and mmengine's `mmseg::` config lookup use pkg_resources (gone in 81).
    'setuptools>=77,<81',
]

setup(
    name='mmseg_gate',
    version='0.2.0',
    description='GATE: guided Stable Diffusion features as an MMSegmentation backbone',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmseg_gate', 'mmseg_gate.*']),
    python_requires='>=3.9',
    install_requires=INSTALL_REQUIRES,
    extras_require={'tests': ['pytest>=7', 'pytest-timeout>=2.1']},
    license='Apache-2.0',
)
