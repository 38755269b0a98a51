#!/bin/sh
# Stop the agent before its files go, on removal only: an upgrade keeps it running and the
# new postinstall restarts it. ExecStopPost thaws anything it froze.
# Called as `prerm remove|upgrade|...` (deb) or `%preun N` (rpm: 0 on removal, 1 on upgrade).
case "$1" in
  remove|deconfigure|0)
    if [ -d "${STASIS_SYSTEMD_RUNTIME:-/run/systemd/system}" ]; then
      systemctl stop stasis.service >/dev/null 2>&1 || true
    fi
    /usr/bin/stasis thaw --all >/dev/null 2>&1 || true
    ;;
esac
exit 0
