#!/usr/bin/env bash
# install-kotlin.sh - install a command-line Kotlin/JVM toolchain for compiling and
# running the uniffi-generated Kotlin bindings in bindings/kotlin/ and their tests
# (no Gradle, no Maven Central needed). Used by scripts/test-bindings.sh.
#
#   kotlinc + kotlin-stdlib + kotlinx-coroutines-core-jvm : npm package "kotlin-compiler"
#   JNA (jna.jar + libjnidispatch)                         : Debian package libjna-java
#   java                                                   : existing JDK, else Debian openjdk-17
#
# Usage (as root; safe to run any number of times):
#   eval "$(scripts/install-kotlin.sh)"    # or: scripts/install-kotlin.sh >/dev/null && . /opt/uniffi-kotlin/env.sh
#
# Root is needed only for what is missing from apt (a JDK, libjna-java, npm); a
# machine that has them can install kotlinc as any user with KOTLIN_PREFIX set.
#
# On success stdout carries only "export NAME=value" lines (also written to
# $KOTLIN_PREFIX/env.sh); all install output goes to a log that is shown on failure.
#
# Settings (environment):
#   KOTLIN_VERSION  npm kotlin-compiler version   (default 2.4.20)
#   KOTLIN_PREFIX   npm --prefix install folder   (default /opt/uniffi-kotlin)
set -euo pipefail

KOTLIN_VERSION="${KOTLIN_VERSION:-2.4.20}"
KOTLIN_PREFIX="${KOTLIN_PREFIX:-/opt/uniffi-kotlin}"
KOTLIN_HOME="$KOTLIN_PREFIX/node_modules/kotlin-compiler"
ENV_FILE="$KOTLIN_PREFIX/env.sh"

LOG="$(mktemp "${TMPDIR:-/tmp}/install-kotlin.XXXXXX")"
cleanup() { rm -f "$LOG"; }
trap cleanup EXIT

die() {
    echo "install-kotlin: error: $*" >&2
    if [ -s "$LOG" ]; then
        echo "install-kotlin: ---- last 40 lines of the install log ----" >&2
        tail -n 40 "$LOG" >&2
    fi
    exit 1
}

quiet() { "$@" >>"$LOG" 2>&1 || die "command failed: $*"; }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# apt_install PKG... : install the Debian packages that are missing; runs
# 'apt-get update' only when a first install attempt fails (stale/missing lists).
apt_install() {
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "must run as root to apt-get install: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1; then
        quiet apt-get update -q
        quiet apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

command -v dpkg-query >/dev/null 2>&1 || die "this script expects a Debian/Ubuntu system (dpkg/apt)"

# 1. Java runtime (kotlinc itself runs on the JVM; JDK 17 verified).
if ! command -v java >/dev/null 2>&1; then
    apt_install openjdk-17-jdk-headless
fi
java -version >>"$LOG" 2>&1 || die "'java -version' failed"

# 2. JNA from Debian (jna.jar; native libjnidispatch comes with libjna-jni).
apt_install libjna-java
JNA_JAR=/usr/share/java/jna.jar
[ -f "$JNA_JAR" ] || die "libjna-java is installed but $JNA_JAR is missing"

# 3. Kotlin compiler from the npm registry.
if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
installed_version=""
if [ -f "$KOTLIN_HOME/build.txt" ]; then
    installed_version="$(tr -d '[:space:]' <"$KOTLIN_HOME/build.txt")"
fi
if [ "$installed_version" != "$KOTLIN_VERSION" ] || [ ! -x "$KOTLIN_HOME/bin/kotlinc" ]; then
    mkdir -p "$KOTLIN_PREFIX" || die "cannot create $KOTLIN_PREFIX"
    quiet env npm_config_update_notifier=false \
        npm install --prefix "$KOTLIN_PREFIX" --no-audit --no-fund --loglevel=error \
        "kotlin-compiler@$KOTLIN_VERSION"
    # the tarball ships its launchers executable; make sure of it anyway
    for f in "$KOTLIN_HOME"/bin/*; do
        case "$f" in *.bat) ;; *) chmod +x "$f" ;; esac
    done
    quiet "$KOTLIN_HOME/bin/kotlinc" -version
fi

for jar in kotlin-stdlib.jar kotlinx-coroutines-core-jvm.jar kotlin-test.jar; do
    [ -f "$KOTLIN_HOME/lib/$jar" ] || die "$KOTLIN_HOME/lib/$jar is missing (broken kotlin-compiler install? remove $KOTLIN_PREFIX and rerun)"
done

# 4. Environment for callers.
env_text="$(cat <<EOF
export KOTLIN_HOME="$KOTLIN_HOME"
export KOTLINC="$KOTLIN_HOME/bin/kotlinc"
export KOTLIN_STDLIB_JAR="$KOTLIN_HOME/lib/kotlin-stdlib.jar"
export KOTLINX_COROUTINES_JAR="$KOTLIN_HOME/lib/kotlinx-coroutines-core-jvm.jar"
export KOTLIN_TEST_JAR="$KOTLIN_HOME/lib/kotlin-test.jar"
export JNA_JAR="$JNA_JAR"
export UNIFFI_KOTLIN_CLASSPATH="$JNA_JAR:$KOTLIN_HOME/lib/kotlinx-coroutines-core-jvm.jar"
export UNIFFI_KOTLIN_RUN_CLASSPATH="$JNA_JAR:$KOTLIN_HOME/lib/kotlinx-coroutines-core-jvm.jar:$KOTLIN_HOME/lib/kotlin-stdlib.jar"
EOF
)"
printf '%s\n' "$env_text" >"$ENV_FILE.tmp" && mv -f "$ENV_FILE.tmp" "$ENV_FILE" || die "cannot write $ENV_FILE"
printf '%s\n' "$env_text"
