# A booted Debian 12 (what Raspberry Pi OS Bookworm is built on): systemd as PID 1, python3
# with venv (Pi OS ships both), nothing of fedbus. edge/install.sh does the rest.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        systemd systemd-sysv dbus python3 python3-venv ca-certificates procps \
 && update-ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/* \
 && systemctl mask getty@.service console-getty.service systemd-logind.service \
        systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
        systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
ENV container=docker
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
