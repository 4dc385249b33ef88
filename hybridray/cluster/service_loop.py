"""Keep a rendered node script running on a host without systemd: restart it with backoff.

On a real host ``hybridray-ray.service`` (systemd, ``Restart=on-failure``) brings a node back
after its ``ray start --block`` exits, e.g. when a partition made the raylet lose the GCS and
give up. Namespace hosts have no systemd, so this loop does the same: each attempt runs in a
session of its own (so whatever an attempt leaves behind is stopped before the next one binds
the same ports), delays double from 2 s to 30 s and reset after a minute of good running, and
SIGTERM stops the current attempt and the loop.
"""

from __future__ import annotations

SCRIPT = r"""#!/usr/bin/env bash
# Run a hybridray node script (head.sh or join-*.sh) and restart it whenever it exits, with
# backoff, until SIGTERM. Usage: service-loop.sh NODE_SCRIPT
NODE_SCRIPT="$1"
stop=0; child=""
on_term() {
  stop=1
  if [ -n "$child" ]; then
    kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null
  fi
}
trap on_term TERM INT
delay=2
while [ "$stop" = 0 ]; do
  started=$(date +%s)
  echo "hybridray service loop: starting $NODE_SCRIPT at $(date -Is)"
  setsid bash "$NODE_SCRIPT" &
  child=$!
  rc=0
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
  kill -KILL -- "-$child" 2>/dev/null  # what the attempt left behind holds its ports
  child=""
  [ "$stop" = 1 ] && break
  if [ $(( $(date +%s) - started )) -ge 60 ]; then delay=2; fi
  echo "hybridray service loop: node exited with code $rc; restarting in ${delay}s"
  sleep "$delay" & wait $! || true
  delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
done
echo "hybridray service loop: stopped at $(date -Is)"
"""
