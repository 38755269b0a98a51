#!/bin/sh
# Let a running systemd see the (new) unit, and restart the agent if it was running, so an
# upgrade takes effect and snapshots go on. Enabling is the administrator's choice.
# Called as `postinst configure [OLD-VERSION]` (deb) or `%post N` (rpm).
if [ -d "${STASIS_SYSTEMD_RUNTIME:-/run/systemd/system}" ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
  systemctl try-restart stasis.service >/dev/null 2>&1 || true
fi
exit 0
