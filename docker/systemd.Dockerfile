# A machine whose PID 1 is systemd, for the test that runs docs/DEPLOY.md as written
# (tests/test_guide.py): Debian bookworm (the base image docker/images.sh makes with debootstrap)
# with systemd, D-Bus and OpenSSH from Debian's packages, fetched from the base's Debian mirror at
# build time (unlike the cluster's images: a site's machine has its distribution's packages).
# Built by `docker/images.sh systemd`; run with SYS_ADMIN, the host's cgroup tree and a tmpfs /run.
ARG BASE
FROM ${BASE}

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        systemd systemd-sysv dbus openssh-server openssh-client >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && systemctl mask getty@tty1.service console-getty.service systemd-logind.service \
 && systemctl enable ssh.service \
 && rm -f /etc/machine-id && touch /etc/machine-id  # each machine makes its own at boot

STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
