# SPDX-License-Identifier: Apache-2.0
# Shell helpers shared by scripts/run and scripts/test (sourced, not run).

# Installs the Debian packages given that are not installed yet.
install_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "== installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}

# What the providers drive: qemu-storage-daemon, qemu-img and qemu-io.
RUNTIME_PACKAGES=(qemu-utils)

# What only the tests need: a real OCI registry (the CNCF distribution server) to pull
# IronCore images from.
TEST_PACKAGES=(docker-registry)
