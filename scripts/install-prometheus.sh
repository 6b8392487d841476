#!/bin/sh
# Install Debian's Prometheus server (the metrics tests scrape Ray through it).
# Idempotent: does nothing when /usr/bin/prometheus exists. Only the binary is
# used; the packaged service is never started (tests run their own on 127.0.0.1).
set -eu
if [ -x /usr/bin/prometheus ]; then
	exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
	SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps the package's post-install from starting the daemon.
POLICY=/usr/sbin/policy-rc.d
CREATED=""
if [ ! -e "$POLICY" ]; then
	printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
	$SUDO chmod +x "$POLICY"
	CREATED=1
fi
$SUDO apt-get update -q || true
$SUDO apt-get install -y -q --no-install-recommends prometheus
if [ -n "$CREATED" ]; then
	$SUDO rm -f "$POLICY"
fi
/usr/bin/prometheus --version
