# One image for every powercap program: webhook, extender, controller and node agent.
#   docker build -t powercap:latest .
#   powercap webhook --cert-dir /certs | powercap extender | powercap controller | powercap agent
# The build stage makes wheels; the final stage installs them into a slim base with no
# compiler, and runs as an unprivileged user (the agent's DaemonSet adds only what NVML
# needs to set power limits; see config/nodeagent/).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config/crd/ config/crd/
COPY powercap/ powercap/
COPY webhook/ webhook/
COPY extender/ extender/
COPY controller/ controller/
COPY nodeagent/ nodeagent/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ARG UID=65532
RUN useradd --uid "${UID}" --user-group --no-create-home --shell /usr/sbin/nologin powercap
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER ${UID}:${UID}
ENTRYPOINT ["powercap"]
CMD ["--help"]
