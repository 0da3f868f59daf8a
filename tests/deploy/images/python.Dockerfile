# Stand-in for python:3.11-slim, built from a debootstrapped Debian 12 (its python3 is 3.11)
# because the check's machine reaches no image registry. `python` and `pip` come first on
# PATH from a venv, as /usr/local/bin does in the official image.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
# The host's locally added certificate authorities (TLS to PyPI goes through them here).
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates procps \
 && update-ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
