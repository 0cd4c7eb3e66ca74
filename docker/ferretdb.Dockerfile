# The database service when mongo:7 cannot be had: the project's embedded
# server (FerretDB + SQLite, built on the host by cm/cluster/ferretdb/build.sh:
# a static binary) on top of the cm image, whose Python answers the healthcheck.
ARG CM_IMAGE
FROM ${CM_IMAGE}
COPY .build/docker/cm-ferretdb /usr/local/bin/cm-ferretdb
EXPOSE 27017
CMD ["cm-ferretdb", "-listen", "0.0.0.0:27017", "-dir", "/data/db"]
