#!/bin/sh
# Installs MobileFM as a system service: the daemon and CLI in a private virtual environment,
# their wrappers, the systemd units, sysusers.d and tmpfiles.d entries, /etc/m4/m4d.toml and
# the default firmware image. `make install` calls this script; it also runs on its own:
#
#   sh systemd/install.sh [VAR=value ...]
#
# Variables (from the environment or as VAR=value arguments):
#   DESTDIR         staging root for packaging; empty installs into the live system
#   PREFIX          /usr/local
#   BINDIR          $PREFIX/bin                     m4d and m4ctl wrappers
#   LIBDIR          $PREFIX/lib                     $LIBDIR/m4/venv, the private environment
#   DATADIR         $PREFIX/share                   $DATADIR/m4/images/default, docs
#   UNITDIR         $LIBDIR/systemd/system          m4d.service, m4d-app.socket, m4d-admin.socket
#   SYSUSERSDIR     $LIBDIR/sysusers.d
#   TMPFILESDIR     $LIBDIR/tmpfiles.d
#   PYTHON          python3   the build interpreter: builds the wheel, builds or verifies the
#                   image (needs this project installed, as in `make setup`'s .venv)
#   VENV_PYTHON     /usr/bin/python3   the interpreter the private venv is made from
#   RUNTIME_PYTHON  unset: use this interpreter instead of a private venv; the wheel is
#                   installed into it unless PIP_INSTALL=no (then it must import m4d already)
#   PIP_ARGS        extra `pip install` arguments, e.g. "--no-index --find-links DIR"
#   IMAGE           an already built image directory to install instead of building one
#
# The configuration always goes to /etc/m4 (where m4d looks; ConfigurationDirectory=m4), and
# an existing /etc/m4/m4d.toml is never overwritten. Into the live system (no DESTDIR) the
# script also creates the user and directories and reloads systemd; it never starts anything.
set -eu
# Installed files are world-readable whatever the caller's umask (0644 files, 0755 dirs).
umask 022

prog=install.sh
die() { echo "$prog: error: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }

for arg in "$@"; do
    case $arg in
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        [A-Z]*=*) export "${arg%%=*}=${arg#*=}" ;;
        *) die "unknown argument '$arg' (expected VAR=value; see --help)" ;;
    esac
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
BINDIR=${BINDIR:-$PREFIX/bin}
LIBDIR=${LIBDIR:-$PREFIX/lib}
DATADIR=${DATADIR:-$PREFIX/share}
UNITDIR=${UNITDIR:-$LIBDIR/systemd/system}
SYSUSERSDIR=${SYSUSERSDIR:-$LIBDIR/sysusers.d}
TMPFILESDIR=${TMPFILESDIR:-$LIBDIR/tmpfiles.d}
SYSCONFDIR=/etc
PYTHON=${PYTHON:-python3}
RUNTIME_PYTHON=${RUNTIME_PYTHON:-}
PIP_INSTALL=${PIP_INSTALL:-yes}
PIP_ARGS=${PIP_ARGS:-}
IMAGE=${IMAGE:-}
if [ -z "${VENV_PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then VENV_PYTHON=/usr/bin/python3; else VENV_PYTHON=python3; fi
fi

check_absolute() { case $2 in /*) ;; *) die "$1 must be an absolute path (got '$2')" ;; esac; }
check_absolute PREFIX "$PREFIX"
check_absolute BINDIR "$BINDIR"
check_absolute LIBDIR "$LIBDIR"
check_absolute DATADIR "$DATADIR"
check_absolute UNITDIR "$UNITDIR"
check_absolute SYSUSERSDIR "$SYSUSERSDIR"
check_absolute TMPFILESDIR "$TMPFILESDIR"
case $DESTDIR in ''|/*) ;; *) die "DESTDIR must be an absolute path (got '$DESTDIR')" ;; esac

# m4d.service has ProtectHome=yes: an interpreter under /home or /root (a pyenv, a user's
# venv) would be invisible to the service and it would fail at start with status 203/EXEC.
check_not_home() {  # $1: what, $2: interpreter
    real=$("$2" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))') \
        || die "$1 '$2' does not run"
    case $real in
        /home/*|/root/*|/run/user/*)
            die "$1 '$2' is $real, under a home directory, which m4d.service cannot see (ProtectHome=yes); use a system interpreter, e.g. VENV_PYTHON=/usr/bin/python3" ;;
    esac
}

"$PYTHON" -c 'import m4ctl, m4image' 2>/dev/null \
    || die "PYTHON=$PYTHON cannot import m4ctl and m4image; run 'make setup' and pass PYTHON=.venv/bin/python"
[ -f "$SRC/clients/python/m4/inference/v1/inference_pb2.py" ] \
    || die "the gRPC stubs are not generated; run 'make protos' first"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/m4-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# ---- the wheel -------------------------------------------------------------------------
# Built from a copy of the source roots, so the work tree (and its build/ images) stays
# untouched and nothing but the packages ends up in the wheel.
say "building the wheel"
mkdir -p "$WORK/src"
for part in pyproject.toml README.md daemon firmware_image clients protos; do
    cp -R "$SRC/$part" "$WORK/src/"
done
find "$WORK/src" -name __pycache__ -type d -prune -exec rm -rf {} +
# Two distributions: the daemon's (mobilefm, the root) and the client's (mobilefm-client,
# clients/python: m4client, m4ctl and the stubs), which the daemon's depends on by name.
if ! "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WORK/wheel" \
        "$WORK/src/clients/python" "$WORK/src" > "$WORK/wheel.log" 2>&1; then
    cat "$WORK/wheel.log" >&2
    die "building the wheels failed; PYTHON needs setuptools and wheel (pip install setuptools wheel)"
fi
WHEEL="$(ls "$WORK"/wheel/mobilefm_client-*.whl) $(ls "$WORK"/wheel/mobilefm-*.whl)"

# ---- the Python environment --------------------------------------------------------------
# pip runs from the build interpreter against the target one (pip --python), so the target
# needs no pip of its own. Byte code is compiled afterwards with DESTDIR stripped from the
# recorded source paths, so tracebacks name the installed files.
pip_install() {  # $1: target interpreter (as it runs now, under DESTDIR)
    # shellcheck disable=SC2086 # PIP_ARGS and WHEEL are lists of arguments
    "$PYTHON" -m pip --python "$1" install --quiet --no-compile --no-warn-script-location \
        $PIP_ARGS $WHEEL || die "pip install into $1 failed"
}
build_kernels() {  # $1: target interpreter; m4d runs torch's kernels if this fails
    "$1" -m m4d.model.kernels build \
        || say "warning: m4's CPU kernels did not build; m4d will use torch's (slower) kernels"
}
compile_site() {  # $1: target interpreter
    for site in $("$1" -c 'import site; print(" ".join(site.getsitepackages()))'); do
        [ -d "$site" ] || continue
        if [ -n "$DESTDIR" ]; then
            "$1" -m compileall -q -j 0 -s "$DESTDIR" -p / "$site" >/dev/null || true
        else
            "$1" -m compileall -q -j 0 "$site" >/dev/null || true
        fi
    done
}

if [ -n "$RUNTIME_PYTHON" ]; then
    check_not_home RUNTIME_PYTHON "$RUNTIME_PYTHON"
    RUN_PY=$RUNTIME_PYTHON
    if [ "$PIP_INSTALL" != no ]; then
        say "installing into $RUNTIME_PYTHON"
        pip_install "$RUNTIME_PYTHON"
        build_kernels "$RUNTIME_PYTHON"
    fi
    "$RUNTIME_PYTHON" -c 'import m4d, m4ctl' \
        || die "RUNTIME_PYTHON=$RUNTIME_PYTHON cannot import m4d and m4ctl"
else
    check_not_home VENV_PYTHON "$VENV_PYTHON"
    RUN_PY=$LIBDIR/m4/venv/bin/python
    venv=$DESTDIR$LIBDIR/m4/venv
    say "creating $venv"
    rm -rf "$venv"
    "$VENV_PYTHON" -m venv --without-pip "$venv" || die "cannot create a venv with $VENV_PYTHON"
    pip_install "$venv/bin/python"
    build_kernels "$venv/bin/python"
    if [ -n "$DESTDIR" ]; then
        # The venv was made under DESTDIR: point its scripts and pyvenv.cfg at the final path.
        for f in "$venv"/pyvenv.cfg "$venv"/bin/*; do
            [ -f "$f" ] && [ ! -L "$f" ] && grep -qI . "$f" 2>/dev/null \
                && sed -i "s|$DESTDIR$LIBDIR/m4/venv|$LIBDIR/m4/venv|g" "$f"
        done
    fi
    compile_site "$venv/bin/python"
fi

# ---- wrappers ------------------------------------------------------------------------------
# exec keeps the PID, so systemd's main process (Type=notify, NotifyAccess=main) is m4d.
# -I: isolated mode, no PYTHON* variables, no user site, no current directory on sys.path.
say "installing wrappers into $DESTDIR$BINDIR"
mkdir -p "$DESTDIR$BINDIR"
for tool in m4d m4ctl; do
    cat > "$WORK/$tool" <<EOF
#!/bin/sh
# $tool, installed by MobileFM's systemd/install.sh.
exec $RUN_PY -I -m $tool "\$@"
EOF
    install -m 0755 "$WORK/$tool" "$DESTDIR$BINDIR/$tool"
done

# ---- systemd -------------------------------------------------------------------------------
say "installing units into $DESTDIR$UNITDIR"
subst() { sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@DATADIR@|$DATADIR|g" "$1"; }
mkdir -p "$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$TMPFILESDIR"
subst "$SRC/systemd/m4d.service" > "$WORK/m4d.service"
install -m 0644 "$WORK/m4d.service" "$DESTDIR$UNITDIR/m4d.service"
install -m 0644 "$SRC/systemd/m4d-app.socket" "$DESTDIR$UNITDIR/m4d-app.socket"
install -m 0644 "$SRC/systemd/m4d-admin.socket" "$DESTDIR$UNITDIR/m4d-admin.socket"
install -m 0644 "$SRC/systemd/sysusers.d/m4.conf" "$DESTDIR$SYSUSERSDIR/m4.conf"
subst "$SRC/systemd/tmpfiles.d/m4.conf" > "$WORK/tmpfiles.conf"
install -m 0644 "$WORK/tmpfiles.conf" "$DESTDIR$TMPFILESDIR/m4.conf"

# ---- configuration and documentation ---------------------------------------------------------
# The pristine config also goes to $DATADIR/m4, to diff against after an upgrade.
mkdir -p "$DESTDIR$SYSCONFDIR/m4/keys" "$DESTDIR$DATADIR/m4" "$DESTDIR$DATADIR/doc/m4"
chmod 0755 "$DESTDIR$SYSCONFDIR/m4" "$DESTDIR$SYSCONFDIR/m4/keys"
install -m 0644 "$SRC/systemd/m4d.toml" "$DESTDIR$DATADIR/m4/m4d.toml"
if [ -e "$DESTDIR$SYSCONFDIR/m4/m4d.toml" ]; then
    say "keeping the existing $DESTDIR$SYSCONFDIR/m4/m4d.toml (new defaults: $DATADIR/m4/m4d.toml)"
else
    install -m 0644 "$SRC/systemd/m4d.toml" "$DESTDIR$SYSCONFDIR/m4/m4d.toml"
fi
install -m 0644 "$SRC/README.md" "$DESTDIR$DATADIR/doc/m4/README.md"

# ---- the default image -------------------------------------------------------------------------
# Files 0644 and directories 0755 whatever the builder's umask: the daemon reads the image
# as user m4, and tmpfiles.d copies it to /var/lib/m4/images/default on first boot.
images=$DESTDIR$DATADIR/m4/images
mkdir -p "$images"
rm -rf "$images/default.new"
if [ -n "$IMAGE" ]; then
    # Every file against the manifest; the signature, if any, is the daemon's to check
    # against /etc/m4/keys on the device (manifest.sig is copied along).
    say "verifying and copying the image $IMAGE"
    "$PYTHON" -m m4ctl image verify --unsigned --quiet "$IMAGE" >/dev/null \
        || die "IMAGE=$IMAGE does not verify; rebuild it with 'm4ctl image build --default'"
    cp -R "$IMAGE" "$images/default.new"
else
    say "building the default image (m4ctl image build --default)"
    "$PYTHON" -m m4ctl image build --default --quiet --output "$images/default.new" >/dev/null \
        || die "building the default image failed"
fi
find "$images/default.new" -type d -exec chmod 0755 {} +
find "$images/default.new" -type f -exec chmod 0644 {} +
rm -rf "$images/default"
mv "$images/default.new" "$images/default"

# ---- the live system ---------------------------------------------------------------------------
if [ -z "$DESTDIR" ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$SYSUSERSDIR/m4.conf"
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create "$TMPFILESDIR/m4.conf"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    say "installed; start it with: systemctl enable --now m4d.service; check it with: m4ctl doctor"
else
    say "installed into $DESTDIR"
fi
