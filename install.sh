#!/bin/sh
# install.sh: install, upgrade or remove smtpgw from an unpacked release tarball.
#
# Usage: sh install.sh [options]            (as root)
#   --prefix DIR     the code                     (default /opt/smtpgw)
#   --confdir DIR    smtpgw.conf and templates    (default /etc/smtpgw)
#   --datadir DIR    bases, bases.backup, quarantine, backup, arch_in, arch_out, updates
#                                                 (default /var/lib/smtpgw)
#   --spooldir DIR   queue/ and control/          (default /var/spool/smtpgw)
#   --logdir DIR     logs                         (default /var/log/smtpgw)
#   --user NAME      service account              (default smtpgw; created if missing)
#   --group NAME     service group                (default: the user's name)
#   --python FILE    Python 3.11 or newer         (default python3 on PATH)
#   --no-service     no systemd unit or init script
#   --init KIND      systemd | sysv | auto        (default auto: systemd when it runs)
#   --root DIR       stage into DIR: every path is written under DIR, files keep the
#                    final paths; no account is created, nothing is chowned or enabled
#   --uninstall      remove the code and the service, logrotate and cron files;
#                    configuration, data, queue and logs are kept
#   --purge          with --uninstall: remove those too
#   --hostname NAME, --domains LIST, --postmaster ADDR, --admin ADDR, --listen IP:PORT,
#   --relay-from NETS, --forward-to HOST[:PORT], --clamd ADDR
#                    a new configuration's answers (postinstall.py asks the others when
#                    run on a terminal); --non-interactive asks nothing
#
# A second run upgrades the code and leaves the configuration and the data alone
# (a newer shipped spam database is installed through keepup2date, keeping the
# previous one in bases.backup). Exits non-zero, saying why, on any failure.
set -eu

PREFIX=/opt/smtpgw
CONFDIR=/etc/smtpgw
DATADIR=/var/lib/smtpgw
SPOOLDIR=/var/spool/smtpgw
LOGDIR=/var/log/smtpgw
RUNDIR=/run/smtpgw
SERVICE_USER=smtpgw
SERVICE_GROUP=
PYTHON=python3
ROOT=
SERVICE=yes
ANSWERS=  # the names of the ANSWER_<name> variables set by options
ASK=yes
INIT=auto
ACTION=install
PURGE=no
MANIFEST=installed-files

die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

say() {
    printf '%s\n' "$*"
}

usage() {
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
}

need() {
    # need "$@" at an option taking a value: fails unless a value follows it.
    [ $# -ge 2 ] || die "$1 needs a value"
    case $2 in -*) die "$1 needs a value, got $2" ;; esac
}

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) need "$@"; PREFIX=$2; shift ;;
        --confdir) need "$@"; CONFDIR=$2; shift ;;
        --datadir) need "$@"; DATADIR=$2; shift ;;
        --spooldir) need "$@"; SPOOLDIR=$2; shift ;;
        --logdir) need "$@"; LOGDIR=$2; shift ;;
        --user) need "$@"; SERVICE_USER=$2; shift ;;
        --group) need "$@"; SERVICE_GROUP=$2; shift ;;
        --python) need "$@"; PYTHON=$2; shift ;;
        --init) need "$@"; INIT=$2; shift ;;
        --root) need "$@"; ROOT=$2; shift ;;
        --no-service) SERVICE=no ;;
        --hostname | --domains | --postmaster | --admin | --listen | --relay-from | --forward-to | --clamd)
            need "$@"
            name=$(printf '%s' "${1#--}" | tr - _)  # one of the names above: safe in a variable name
            eval "ANSWER_$name=\$2"
            ANSWERS="$ANSWERS $name"; shift ;;
        --non-interactive) ASK=no ;;
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=yes ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
SERVICE_GROUP=${SERVICE_GROUP:-$SERVICE_USER}

# Paths are written unquoted into the unit, the init script and the cron line.
for path in "$PREFIX" "$CONFDIR" "$DATADIR" "$SPOOLDIR" "$LOGDIR"; do
    case $path in
        */../* | */.. | *[!A-Za-z0-9._/+-]*) die "$path: use an absolute path of letters, digits and . _ / + -" ;;
        /?*) ;;
        *) die "$path: an absolute path below / is needed" ;;
    esac
done
case $ROOT in
    '' | /) ROOT= ;;
    /*) ROOT=${ROOT%/} ;;
    *) die "--root $ROOT: an absolute path is needed" ;;
esac
case $INIT in auto | systemd | sysv) ;; *) die "--init $INIT: systemd, sysv or auto" ;; esac
case $SERVICE_USER$SERVICE_GROUP in *[!a-z0-9_-]*) die "--user/--group: lower-case account names" ;; esac
[ "$PURGE" = no ] || [ "$ACTION" = uninstall ] || die "--purge goes with --uninstall"

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "run as root, or stage the installation with --root DIR"
fi

DEST=$ROOT$PREFIX

uninstall() {
    [ -f "$DEST/$MANIFEST" ] || die "no smtpgw installed in $DEST ($DEST/$MANIFEST is missing)"
    kind=$(sed -n 's/^service //p' "$DEST/$MANIFEST")
    if [ -z "$ROOT" ]; then
        case $kind in
            systemd) systemctl disable --now smtpgw.service || say "warning: systemctl could not stop smtpgw" ;;
            sysv)
                "/etc/init.d/smtpgw" stop || say "warning: /etc/init.d/smtpgw stop failed"
                if command -v update-rc.d >/dev/null 2>&1; then update-rc.d -f smtpgw remove >/dev/null
                elif command -v chkconfig >/dev/null 2>&1; then chkconfig --del smtpgw; fi ;;
        esac
    fi
    grep '^file /' "$DEST/$MANIFEST" | while read -r _ file; do
        rm -f "$ROOT$file" && say "removed $file"
    done
    kept=$(sed -n 's/^keep //p' "$DEST/$MANIFEST")
    if [ "$kind" = systemd ] && [ -z "$ROOT" ]; then systemctl daemon-reload || :; fi
    rm -rf "$DEST"
    say "removed $PREFIX"
    for dir in $kept; do
        [ -e "$ROOT$dir" ] || continue
        if [ "$PURGE" = yes ]; then rm -rf "$ROOT$dir" && say "removed $dir"; else say "kept $dir"; fi
    done
    say "smtpgw uninstalled$( [ "$PURGE" = yes ] || printf ' (the account %s is kept)' "$SERVICE_USER")"
}

if [ "$ACTION" = uninstall ]; then
    uninstall
    exit 0
fi

# --- install or upgrade ----------------------------------------------------------
SRC=$(cd "$(dirname "$0")" && pwd)
for item in smtpgw.py smtpgw/__init__.py smtpgw/bases smtpgw/templates postinstall.py smtpgw.conf.sample \
            dist/smtpgw.service.in dist/smtpgw.init dist/logrotate.smtpgw dist/cron.smtpgw; do
    [ -e "$SRC/$item" ] || die "$SRC is not an smtpgw release folder ($item is missing)"
done
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: Python 3.11 or newer is needed"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); 3.11 or newer is needed"
# The interpreter itself (not a wrapper such as a pyenv shim) goes into the unit and cron.
PYTHON_PATH=$("$PYTHON" -c 'import sys; print(sys.executable)')
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/smtpgw/__init__.py")
say "installing smtpgw ${VERSION:-?} into ${ROOT:+$ROOT (staging) with prefix }$PREFIX"

if [ -z "$ROOT" ]; then
    if ! getent group "$SERVICE_GROUP" >/dev/null; then
        command -v groupadd >/dev/null || die "group $SERVICE_GROUP is missing and groupadd is not available: create it and run again"
        groupadd --system "$SERVICE_GROUP" || die "cannot create the group $SERVICE_GROUP"
        say "created group $SERVICE_GROUP"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        command -v useradd >/dev/null || die "account $SERVICE_USER is missing and useradd is not available: create it and run again"
        useradd --system --gid "$SERVICE_GROUP" --home-dir "$DATADIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "smtpgw mail gateway" "$SERVICE_USER" ||
            die "cannot create the account $SERVICE_USER"
        say "created account $SERVICE_USER"
    fi
fi

# The code: staged beside the old one, then swapped in by renames.
mkdir -p "$DEST" || die "cannot create $DEST"
STAGE=$DEST/.install.$$
trap 'rm -rf "$STAGE"' EXIT
rm -rf "$STAGE"
mkdir "$STAGE"
cp -R "$SRC/smtpgw" "$SRC/dist" "$STAGE/" || die "cannot copy the code into $DEST"
for file in smtpgw.py postinstall.py install.sh smtpgw.conf.sample LICENSE README.md ARCHITECTURE.md; do
    if [ -f "$SRC/$file" ]; then cp "$SRC/$file" "$STAGE/" || die "cannot copy $file into $DEST"; fi
done
find "$STAGE/smtpgw" "$STAGE/dist" \( -name __pycache__ -o -name '*.py[co]' -o -name '.*' \) -prune \
    -exec rm -rf {} + || die "cannot clean $STAGE"
"$PYTHON_PATH" -m compileall -q "$STAGE/smtpgw" >/dev/null || die "the code does not compile with $PYTHON_PATH"
for item in smtpgw dist; do
    rm -rf "$DEST/$item.old"
    if [ -e "$DEST/$item" ]; then mv "$DEST/$item" "$DEST/$item.old"; fi
    mv "$STAGE/$item" "$DEST/$item" || die "cannot move the new $item into $DEST"
    rm -rf "$DEST/$item.old"
done
for file in "$STAGE"/*; do
    [ -e "$file" ] || continue
    mv -f "$file" "$DEST/" || die "cannot move $(basename "$file") into $DEST"
done
chmod 0755 "$DEST/smtpgw.py" "$DEST/postinstall.py" "$DEST/install.sh"
say "code installed in $PREFIX"

# Folders: data, queue, control and logs belong to the service account.
make_dir() {
    # make_dir MODE OWNED DIR: create DIR (and parents) under the root; OWNED=yes gives it
    # to the service account on a live install. Existing folders keep their contents.
    mkdir -p "$ROOT$3" || die "cannot create $ROOT$3"
    chmod "$1" "$ROOT$3"
    if [ "$2" = yes ] && [ -z "$ROOT" ]; then
        chown "$SERVICE_USER:$SERVICE_GROUP" "$3" || die "cannot give $3 to $SERVICE_USER"
    fi
}
make_dir 0755 no "$CONFDIR"
make_dir 0750 yes "$DATADIR"
for dir in bases bases.backup updates; do make_dir 0755 yes "$DATADIR/$dir"; done
for dir in quarantine backup arch_in arch_out; do make_dir 0700 yes "$DATADIR/$dir"; done
make_dir 0750 yes "$SPOOLDIR"
make_dir 0700 yes "$SPOOLDIR/queue"
make_dir 0750 yes "$SPOOLDIR/control"
make_dir 0750 yes "$LOGDIR"

set -- --prefix "$PREFIX" --confdir "$CONFDIR" --datadir "$DATADIR" --spooldir "$SPOOLDIR" \
    --logdir "$LOGDIR" --rundir "$RUNDIR" --user "$SERVICE_USER" --group "$SERVICE_GROUP" \
    --python "$PYTHON_PATH" --init "$INIT"
[ -z "$ROOT" ] || set -- "$@" --root "$ROOT"
[ "$SERVICE" = yes ] || set -- "$@" --no-service
for name in $ANSWERS; do
    eval "value=\$ANSWER_$name"
    set -- "$@" "--$(printf '%s' "$name" | tr _ -)=$value"
done
[ "$ASK" = yes ] || set -- "$@" --non-interactive
status=0
"$PYTHON_PATH" "$DEST/postinstall.py" "$@" || status=$?
case $status in
    0) say "smtpgw ${VERSION:-?} installed" ;;
    2) die "smtpgw ${VERSION:-?} installed, but $CONFDIR/smtpgw.conf fails the check: fix it, then start the gateway" ;;
    *) die "postinstall.py failed (exit $status): see the messages above" ;;
esac
