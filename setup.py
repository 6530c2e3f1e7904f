"""Packaging for apla_mm.

The OpenMMLab stack is pinned to the versions that work together today:
mmcv 2.1.0 (mmseg 1.2.2 and mmdet 3.3.0 assert mmcv < 2.2.0) comes prebuilt
from OpenMMLab for torch 2.1 and must be built from source for newer torch,
up to 2.13 (its C++17 build rejects newer torch headers). CI tests both ends,
torch 2.1.2 and 2.13.0 (``tools/constraints/``). ``tools/install.sh``
performs the build; a plain ``pip install`` of this package expects torch
and mmcv to be present already.
"""
import os
import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

#: What a normal install ships inside the package (``apla_mm/.mim``), as
#: OpenMMLab's packages ship theirs for ``mim``; found at run time by
#: :func:`apla_mm.utils.paths.configs_root`.
MIM_FILES = ('configs', )
#: setup.py commands that build a distribution (not an editable install,
#: which reads ``configs/`` from the checkout).
_BUILD_COMMANDS = ('install', 'build', 'build_py', 'bdist_wheel', 'sdist')


def read_version() -> str:
    namespace: dict = {}
    with open(osp.join('apla_mm', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def copy_mim_files() -> None:
    """Copy :data:`MIM_FILES` into ``apla_mm/.mim`` for a distribution.

    Skipped for an editable install (``develop``, ``editable_wheel``): the
    package then uses the checkout's own ``configs/``.
    """
    commands = set(sys.argv[1:])
    if commands & {'develop', 'editable_wheel'} or \
            not commands & set(_BUILD_COMMANDS):
        return
    mim = osp.join('apla_mm', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in MIM_FILES:
        target = osp.join(mim, name)
        if osp.islink(target) or osp.isfile(target):
            os.remove(target)
        elif osp.isdir(target):
            shutil.rmtree(target)
        shutil.copytree(name, target,
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


def read_readme() -> str:
    with open('README.md', encoding='utf-8') as f:
        return f.read()


install_requires = [
    # Exactly the two ends CI tests (tools/constraints/torch-*.txt).
    'torch>=2.1.2,<=2.13.0',
    'torchvision',
    'mmcv>=2.0.0,<2.2.0',
    'mmengine==0.10.7',
    'mmsegmentation==1.2.2',
    'mmdet==3.3.0',
    'timm>=1.0.15',
    # mmengine resolves `mmseg::`/`mmdet::` config bases with pkg_resources,
    # which setuptools removed in version 81.
    'setuptools<81',
    # mmseg 1.2.2 imports these at import time (tokenizer utilities).
    'ftfy',
    'regex',
    'safetensors',
    'numpy',
    'opencv-python',
    'pycocotools',
    'matplotlib',
    'tqdm',
]

#: Official model code that writes the checkpoint layouts tests/test_weights.py
#: loads (test-only). Pinned to versions that run on both tested stacks:
#: transformers >= 4.57 needs torch >= 2.2 (torch.utils._pytree), 5.x
#: disables itself on torch 2.1; 4.51.3 runs on 2.1.2 and 2.13.0 (numpy 1 and
#: 2) and brings huggingface_hub < 1.0 and tokenizers (~6 s to install).
WEIGHT_LAYOUT_TESTS = [
    'transformers==4.51.3', 'segment-anything==1.0', 'open_clip_torch==3.3.0'
]
extras_require = {
    'test': ['pytest>=7', 'pytest-timeout', 'pytest-xdist>=3'] +
    WEIGHT_LAYOUT_TESTS,
    'dev': ['pytest>=7', 'pytest-timeout', 'pytest-xdist>=3', 'ruff'] +
    WEIGHT_LAYOUT_TESTS,
}

copy_mim_files()
setup(
    name='apla_mm',
    version=read_version(),
    description=('APLA (attention projection layer adaptation) and memory '
                 'efficient ViT adapters for OpenMMLab dense prediction'),
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10,<3.13',
    packages=find_packages(include=['apla_mm', 'apla_mm.*']),
    include_package_data=True,
    package_data={'apla_mm': ['.mim/configs/**/*.py']},
    install_requires=install_requires,
    extras_require=extras_require,
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
