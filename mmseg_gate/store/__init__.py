"""Extract once, train many: the frozen half's features in a store on disk.

``writer`` extracts an image list (``mmseg_gate.datasets.image_lists``) with a source config
(resumable, distributed), ``manifest`` says what a store is and refuses mismatches,
``reader`` serves stored features memory-mapped, ``source`` puts a store behind the source
contract (:class:`StoredSource`).
"""
from .manifest import StoreError, make_header, read_manifest
from .reader import FeatureStore
from .source import StoredSource
from .writer import extract_features

__all__ = ['StoreError', 'make_header', 'read_manifest', 'FeatureStore', 'StoredSource',
           'extract_features']
