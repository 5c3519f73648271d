#!/usr/bin/env bash
# System packages the tests use, from Debian's archive:
#   chromium, chromium-driver   headless browser for the report browser tests
#   orthanc, orthanc-dicomweb   a real PACS with DICOMweb for the `pneumodet pacs` round-trip tests
#   dicom3tools                 dciodvfy: validates every SR and presentation state pneumodet writes
#   dcmtk                       dcmdump / dsr2xml, to read those objects back
# Installs only what is missing; without root or apt-get it changes nothing and exits 0 (the tests that
# need a missing program are skipped and say why).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v dcmdump >/dev/null 2>&1 || missing+=(dcmtk)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: not root or no apt-get; missing ${missing[*]}: the tests needing them will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# (the orthanc package may start a system service of its own; the tests never use it: they start their own
# Orthanc on free loopback ports with a temporary storage folder)
apt-get install -y -qq "${missing[@]}" >/dev/null
