"""Packaging for apla_mm.

The OpenMMLab stack is pinned to the versions that work together today:
mmcv 2.1.0 (mmseg 1.2.2 and mmdet 3.3.0 assert mmcv < 2.2.0) must be built
from source against torch <= 2.13 (its C++17 build rejects newer torch
headers). ``tools/install.sh`` performs that build; a plain ``pip install``
of this package expects torch and mmcv to be present already.
"""
import os.path as osp

from setuptools import find_packages, setup


def read_version() -> str:
    namespace: dict = {}
    with open(osp.join('apla_mm', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_readme() -> str:
    with open('README.md', encoding='utf-8') as f:
        return f.read()


install_requires = [
    'torch>=2.1,<=2.13.0',
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

extras_require = {
    'test': ['pytest>=7', 'pytest-timeout'],
    'dev': ['pytest>=7', 'pytest-timeout', 'ruff'],
}

setup(
    name='apla_mm',
    version=read_version(),
    description=('APLA (attention projection layer adaptation) and memory '
                 'efficient ViT adapters for OpenMMLab dense prediction'),
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['apla_mm', 'apla_mm.*']),
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras_require,
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
