"""A user's scan as data_prep.py cuts it (from a file or a store), the slice geometry a store was built with,
and slabs written back as NIfTI on the scan's grid."""
import gzip
import os
import sys

import numpy as np

from mri.data.io import atomic_path


def store_geometry(store):
    """(slices, spacing) a store was built with, from its provenance (None when not recorded)."""
    a = store.provenance.get("arguments", {}) if store is not None else {}
    return (a.get("slices"), a.get("spacing")) if a.get("slices") and a.get("spacing") else None


def slab_geometry(spec, store, train_store_path, slices=None, spacing=None):
    """(slices, spacing, the path of the store whose geometry was recorded, or None): `slices` and `spacing`
    (--slices, --spacing), else the provenance of `store`, else of the run's training store. A geometry other
    than the store's is allowed, with a warning: the method then sees slice positions it was not trained at."""
    from mri.data.store import SliceStore, StoreError
    source = store
    if source is None and train_store_path:
        try:
            source = SliceStore(train_store_path)
        except StoreError:
            source = None
    recorded = store_geometry(source)
    if recorded is None and not (slices and spacing):
        where = source.path if source is not None else (train_store_path or "unknown")
        raise ValueError(f"the slice geometry of {spec}'s training store ({where}) is not known (store missing or "
                         "without provenance): give --slices and --spacing as that store was built "
                         "(data_prep.py defaults: --slices 32 --spacing 2), or --store")
    slices, spacing = slices or recorded[0], spacing or recorded[1]
    if recorded is not None and (slices, spacing) != tuple(recorded):
        print(f"warning: {slices} slices {spacing:g} mm apart differ from the {recorded[0]} slices {recorded[1]:g} mm "
              f"apart of {source.path}: the slab's slice positions are not the store's", file=sys.stderr)
    return slices, spacing, source.path if recorded is not None else None


def scan_from_file(path, size, slices, spacing):
    """(slab (slices, size, size) in [-1, 1], plan), exactly as data_prep.py cuts a volume."""
    from mri.data.volumes import BadVolume, process_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    try:
        return process_file(path, size, slices, spacing)
    except BadVolume as e:
        raise ValueError(f"--input {path}: {e}; give a 3D NIfTI (.nii, .nii.gz) or Analyze (.img/.hdr) volume") from e


def scan_from_store(store, subject, visit):
    """(slab, plan, store indices of its slices in slab order, raw attributes, visit) of a stored volume."""
    rows = np.flatnonzero(store.subject == subject)
    if rows.size == 0:
        some = ", ".join(sorted(set(store.subject))[:5])
        raise KeyError(f"--subject {subject} is not in {store.path} (subjects include {some})")
    visits = list(dict.fromkeys(store.visit[rows]))
    visit = visit or visits[0]
    if visit not in visits:
        raise KeyError(f"--visit {visit}: subject {subject} has visits {', '.join(visits)} in {store.path}")
    rows = rows[store.visit[rows] == visit]
    volume = int(store.volume[rows[0]])
    idx = np.flatnonzero(store.volume == volume)
    idx = idx[np.argsort(store.slice[idx], kind="stable")]
    return store.images(idx), store.plan(volume), idx, {n: float(store.attrs[n][idx[0]]) for n in store.schema.names}, visit


def xform_code(path):
    """The input's NIfTI sform (else qform) code, so outputs declare the same space (1, scanner, otherwise)."""
    import nibabel as nib
    try:
        header = nib.load(path).header
        for code in (int(header["sform_code"]), int(header["qform_code"])):
            if code > 0:
                return code
    except Exception:   # Analyze headers have no codes; an unreadable file was reported before
        pass
    return 1


def write_nifti(path, slab, affine, code):
    """A slab as float32 NIfTI on the RAS grid of `slab_affine`, written atomically (gzip without a timestamp,
    so equal inputs give equal files)."""
    import nibabel as nib
    from mri.data.volumes import slab_to_volume
    img = nib.Nifti1Image(slab_to_volume(slab).astype(np.float32), affine)
    img.header.set_sform(affine, code)
    img.header.set_qform(affine, code)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
