# SPDX-License-Identifier: Apache-2.0
# Shell helpers shared by scripts/run and scripts/test (sourced, not run).

# Runs a command as root (sudo when not root already).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# On Debian 12 (bookworm), QEMU 10 comes from bookworm-backports (bookworm itself has 7.2, and
# qemu-system-x86 must match the qemu-utils the machine already has). Adds that source if it
# is missing; prints the apt target release to install from (empty elsewhere).
backports_release() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ "$codename" = bookworm ] || return 0
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "== adding the bookworm-backports apt source (QEMU 10)" >&2
    as_root tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  fi
  echo bookworm-backports
}

# Installs the Debian packages given that are not installed yet (from backports where the
# release has them: a newer QEMU).
install_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  local release target=()
  release=$(backports_release)
  [ -n "$release" ] && target=(-t "$release")
  echo "== installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${INSTALL_OPTIONS:-} "${target[@]}" "${missing[@]}"
}

# What the providers drive: qemu-storage-daemon, qemu-img and qemu-io (volumes), and
# qemu-system-x86_64 with OVMF (machines; UEFI for disk images), QEMU's rbd driver (ceph
# volumes) and ip (bridge NICs).
RUNTIME_PACKAGES=(qemu-utils qemu-system-x86 qemu-block-extra ovmf iproute2)

# What only the tests need: a real OCI registry (the CNCF distribution server) to pull
# IronCore images from.
TEST_PACKAGES=(docker-registry binutils fdisk mtools)

# A single-node Ceph cluster for the machine provider's ceph volumes (scripts/ceph-test-cluster),
# installed without recommends (those are a dashboard and disk tools, ~150 MB more).
CEPH_TEST_PACKAGES=(ceph-mon ceph-osd ceph-common)

# The S3 client the bucket tests (and the conformance suite's bucket data-plane profile) drive.
PYTHON_PACKAGES=(boto3)

# Installs the Python packages given that are missing (pip, for the current python3).
install_python_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    python3 -c "import $pkg" 2>/dev/null || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "== pip installing ${missing[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${missing[@]}"
}
