"""Results a hospital can open: DICOM Structured Reports, presentation states and a DICOMweb round trip.

* :mod:`~pneumodet.clinical.identity`: who made a result (algorithm name, version, checkpoint SHA-256) and
  the UIDs of the objects it writes (root ``2.25``, or the site's own root; see there).
* :mod:`~pneumodet.clinical.sr`: one image's prediction as a Comprehensive 3D SR (TID 1500 Measurement
  Report) and a Grayscale Softcopy Presentation State, built with highdicom from an allow-listed copy of
  the source header; :func:`~pneumodet.clinical.sr.write_dicom_results` writes them for ``predict
  --dicom-out``.
* :mod:`~pneumodet.clinical.dicomweb`: a thin DICOMweb client (QIDO-RS, WADO-RS, STOW-RS over
  ``dicomweb-client``) with credentials from the environment or a file, timeouts, bounded retries with
  back-off and one-line errors naming the server and the status.
* :mod:`~pneumodet.clinical.pacs`: ``pneumodet pacs``: find -> fetch -> predict -> store, chunk by chunk,
  with a summary of exactly what was and was not stored.

Nothing here is imported by the rest of the library; submodules import highdicom and dicomweb-client
only when used, so ``pneumodet --help`` stays fast.
"""
