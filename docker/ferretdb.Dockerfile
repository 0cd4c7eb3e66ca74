# The database service when mongo:7 cannot be had: the project's embedded
# server (FerretDB + SQLite, built on the host by cm/cluster/ferretdb/build.sh:
# a static binary) on top of the cm image, whose Python answers the healthcheck.
ARG CM_IMAGE
FROM ${CM_IMAGE}
COPY .build/docker/cm-ferretdb /usr/local/bin/cm-ferretdb
# no TCP port: docker-compose.yml gives it the root-only socket /cm/db/db.sock, shared with the head alone
CMD ["cm-ferretdb", "-listen-unix", "/cm/db/db.sock", "-dir", "/data/db"]
