#!/usr/bin/env bash
# Writes a minimal ClickHouse server config (config.xml, users.xml) into DIR:
# loopback only, the given ports, data under DIR, user `default` without a
# password. Used by scripts/demo.sh and loadtest/compare.sh --tee; the caller
# starts `clickhouse-server --config-file=DIR/config.xml` and stops it.
# Usage: scripts/clickhouse-config.sh DIR HTTP_PORT TCP_PORT INTERSERVER_PORT
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 DIR HTTP_PORT TCP_PORT INTERSERVER_PORT" >&2; exit 2; }
dir=$1 http=$2 tcp=$3 inter=$4
mkdir -p "$dir"
cat > "$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$http</http_port>
  <tcp_port>$tcp</tcp_port>
  <interserver_http_port>$inter</interserver_http_port>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <format_schema_path>$dir/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
XML
cat > "$dir/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
XML
