# Stand-in for eclipse-mosquitto:2: Debian's mosquitto with the same paths
# (/mosquitto/config, /mosquitto/data owned by the broker's user).
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log \
 && chown -R mosquitto:mosquitto /mosquitto/data /mosquitto/log
ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
