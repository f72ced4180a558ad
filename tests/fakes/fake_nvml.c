/*
 * A fake libnvidia-ml.so.1 for tests: pynvml loads it and makes real ctypes calls into it.
 *
 * Built by the test session (tests/fakes/nvml.py):
 *   gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 fake_nvml.c
 * Never committed (*.so is ignored).
 *
 * It implements the NVML entry points the node agent uses, with the signatures and struct
 * layouts of nvml.h (the names pynvml resolves: nvmlInitWithFlags, nvmlInit_v2,
 * nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2,
 * nvmlDeviceGetComputeRunningProcesses_v3, ...). Limits are in milliwatts, energy in
 * millijoules, temperatures in degC, as in NVML.
 *
 * Control, one command a line (the same parser for both ways in):
 *   - in-process: fake_nvml_command("power_mw 0 350000") through ctypes;
 *   - subprocesses: the file named by $FAKE_NVML_CONTROL, checked before every NVML call;
 *     when its mtime or size changes, the lines added since the last read are applied
 *     (a truncated or replaced file is read again from the start).
 *
 * Commands (GPU is an index; '#' starts a comment):
 *   reset                             default state: 1 GPU, no errors, counters zero
 *   count N                           number of GPUs (at most 16)
 *   uuid GPU UUID | name GPU NAME...  identity (a name may contain spaces)
 *   power_mw GPU MW | temp_c GPU C    readings
 *   limits_mw GPU MIN MAX DEFAULT     constraints and default limit
 *   limit_mw GPU MW                   the power management limit (as if set earlier)
 *   limiter_mw GPU MW                 an out-of-band limiter: enforced = min(limit, MW);
 *                                     0 removes it
 *   slowdown_c GPU C | shutdown_c GPU C   temperature thresholds
 *   energy_mj GPU MJ                  total energy counter
 *   pids GPU [PID...]                 running compute processes
 *   error FUNCTION GPU|* CODE [TIMES] make FUNCTION return CODE for that GPU (or any),
 *                                     TIMES times (default: until cleared)
 *   clear_errors | driver_version V
 *
 * Every call of nvmlDeviceSetPowerManagementLimit, successful or not, is counted
 * (fake_nvml_set_calls) and, when $FAKE_NVML_SET_LOG names a file, appended to it as
 * "nvmlDeviceSetPowerManagementLimit gpu=I limit_mw=MW rc=RC". Single-threaded.
 *
 * When $FAKE_NVML_STATE names a file, the limits in force are written to it whenever they
 * may have changed (nvmlInit, a successful set, control lines applied), atomically (a
 * temporary file renamed over it), so a test can sample what a child process enforces:
 *   count N set_calls C
 *   gpu I limit_mw MW enforced_mw MW min_mw MW max_mw MW default_mw MW   (one line per GPU)
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

enum { NVML_TEMPERATURE_GPU = 0 };
enum { NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1 };
#define NVML_TEMPERATURE_V1 0x100000Cu /* sizeof(nvmlTemperature_v1_t) | 1 << 24 */

#define MAX_GPUS 16
#define MAX_PROCS 64
#define MAX_INJECTIONS 64
#define MAX_COUNTERS 64
#define TEXT_LEN 96

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_v2_t; /* = nvmlProcessInfo_t of the _v3 process query */

typedef struct {
    unsigned int version;
    unsigned int sensorType;
    int temperature;
} nvmlTemperature_v1_t;

struct fake_gpu {
    char uuid[TEXT_LEN];
    char name[TEXT_LEN];
    unsigned int min_mw, max_mw, default_mw, limit_mw, limiter_mw, power_mw;
    unsigned int temp_c, slowdown_c, shutdown_c;
    unsigned long long energy_mj;
    unsigned int nprocs;
    unsigned int pids[MAX_PROCS];
};
typedef struct fake_gpu *nvmlDevice_t;

struct injection {
    char fn[64];
    int gpu; /* -1: any */
    nvmlReturn_t code;
    long remaining; /* < 0: until cleared */
};

struct counter {
    char fn[64];
    unsigned long count;
};

static struct fake_gpu gpus[MAX_GPUS];
static unsigned int gpu_count;
static int init_refcount;
static char driver_version[TEXT_LEN];
static struct injection injections[MAX_INJECTIONS];
static int n_injections;
static struct counter counters[MAX_COUNTERS];
static int n_counters;
static unsigned long set_calls;

static struct {
    ino_t ino;
    off_t size;
    struct timespec mtime;
    long offset;
} control;

/* ---------------------------------------------------------------- state and commands */

static void reset_state(void) {
    memset(gpus, 0, sizeof gpus);
    for (unsigned int i = 0; i < MAX_GPUS; i++) {
        struct fake_gpu *g = &gpus[i];
        snprintf(g->uuid, TEXT_LEN, "GPU-fa4e0000-0000-4000-8000-%012x", i);
        snprintf(g->name, TEXT_LEN, "NVIDIA H200");
        g->min_mw = 200000;
        g->max_mw = 700000;
        g->default_mw = 700000;
        g->limit_mw = 700000;
        g->power_mw = 75000;
        g->temp_c = 35;
        g->slowdown_c = 89;
        g->shutdown_c = 95;
    }
    gpu_count = 1;
    snprintf(driver_version, TEXT_LEN, "580.65.06");
    n_injections = 0;
    n_counters = 0;
    set_calls = 0;
}

static int parse_ull(const char *token, unsigned long long *out) {
    char *end;
    if (token == NULL || *token == '\0' || *token == '-') return -1;
    errno = 0;
    *out = strtoull(token, &end, 10);
    return (errno || *end != '\0') ? -1 : 0;
}

static int parse_uint(const char *token, unsigned int *out) {
    unsigned long long value;
    if (parse_ull(token, &value) || value > 0xffffffffull) return -1;
    *out = (unsigned int)value;
    return 0;
}

static int parse_gpu(const char *token, int *out) {
    unsigned int value;
    if (parse_uint(token, &value) || value >= MAX_GPUS) return -1;
    *out = (int)value;
    return 0;
}

static const char *rest_of_line(char *save) {
    while (save && (*save == ' ' || *save == '\t')) save++;
    return (save && *save) ? save : NULL;
}

static int add_injection(char **save) {
    const char *fn = strtok_r(NULL, " \t", save);
    const char *gpu = strtok_r(NULL, " \t", save);
    const char *code = strtok_r(NULL, " \t", save);
    const char *times = strtok_r(NULL, " \t", save);
    struct injection inj = {.remaining = -1};
    unsigned int value;
    unsigned long long count;
    if (fn == NULL || strlen(fn) >= sizeof inj.fn || gpu == NULL) return -1;
    if (n_injections >= MAX_INJECTIONS) return -1;
    snprintf(inj.fn, sizeof inj.fn, "%s", fn);
    if (strcmp(gpu, "*") == 0) inj.gpu = -1;
    else if (parse_gpu(gpu, &inj.gpu)) return -1;
    if (parse_uint(code, &value)) return -1;
    inj.code = (nvmlReturn_t)value;
    if (times) {
        if (parse_ull(times, &count)) return -1;
        inj.remaining = (long)count;
    }
    injections[n_injections++] = inj;
    return 0;
}

static int set_gpu_field(const char *cmd, struct fake_gpu *g, char **save) {
    const char *arg = strtok_r(NULL, " \t", save);
    unsigned int *field = NULL;
    if (strcmp(cmd, "uuid") == 0) {
        if (arg == NULL || strlen(arg) >= TEXT_LEN) return -1;
        snprintf(g->uuid, TEXT_LEN, "%s", arg);
        return 0;
    }
    if (strcmp(cmd, "name") == 0) {
        /* the name is the rest of the line, spaces included */
        if (arg == NULL) return -1;
        char name[TEXT_LEN * 2];
        const char *more = rest_of_line(*save);
        snprintf(name, sizeof name, "%s%s%s", arg, more ? " " : "", more ? more : "");
        if (strlen(name) >= TEXT_LEN) return -1;
        memcpy(g->name, name, strlen(name) + 1);
        *save = NULL;
        return 0;
    }
    if (strcmp(cmd, "energy_mj") == 0) return parse_ull(arg, &g->energy_mj);
    if (strcmp(cmd, "limits_mw") == 0) {
        unsigned int min_mw, max_mw, default_mw;
        if (parse_uint(arg, &min_mw) || parse_uint(strtok_r(NULL, " \t", save), &max_mw) ||
            parse_uint(strtok_r(NULL, " \t", save), &default_mw) || min_mw > max_mw)
            return -1;
        g->min_mw = min_mw;
        g->max_mw = max_mw;
        g->default_mw = default_mw;
        return 0;
    }
    if (strcmp(cmd, "pids") == 0) {
        unsigned int n = 0;
        for (; arg; arg = strtok_r(NULL, " \t", save)) {
            if (n >= MAX_PROCS || parse_uint(arg, &g->pids[n])) return -1;
            n++;
        }
        g->nprocs = n;
        return 0;
    }
    if (strcmp(cmd, "power_mw") == 0) field = &g->power_mw;
    else if (strcmp(cmd, "limit_mw") == 0) field = &g->limit_mw;
    else if (strcmp(cmd, "limiter_mw") == 0) field = &g->limiter_mw;
    else if (strcmp(cmd, "temp_c") == 0) field = &g->temp_c;
    else if (strcmp(cmd, "slowdown_c") == 0) field = &g->slowdown_c;
    else if (strcmp(cmd, "shutdown_c") == 0) field = &g->shutdown_c;
    return field ? parse_uint(arg, field) : -1;
}

static int apply_command(const char *line) {
    char buf[2048];
    char *save = NULL;
    size_t len = strlen(line);
    if (len >= sizeof buf) return -1;
    memcpy(buf, line, len + 1);
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r')) buf[--len] = '\0';
    const char *cmd = strtok_r(buf, " \t", &save);
    if (cmd == NULL || cmd[0] == '#') return 0;
    if (strcmp(cmd, "reset") == 0) {
        reset_state();
        return 0;
    }
    if (strcmp(cmd, "clear_errors") == 0) {
        n_injections = 0;
        return 0;
    }
    if (strcmp(cmd, "error") == 0) return add_injection(&save);
    if (strcmp(cmd, "count") == 0) {
        unsigned int n;
        if (parse_uint(strtok_r(NULL, " \t", &save), &n) || n > MAX_GPUS) return -1;
        gpu_count = n;
        return 0;
    }
    if (strcmp(cmd, "driver_version") == 0) {
        const char *v = strtok_r(NULL, " \t", &save);
        if (v == NULL || strlen(v) >= TEXT_LEN) return -1;
        snprintf(driver_version, TEXT_LEN, "%s", v);
        return 0;
    }
    int gpu;
    if (parse_gpu(strtok_r(NULL, " \t", &save), &gpu)) return -1;
    return set_gpu_field(cmd, &gpus[gpu], &save);
}

static void apply_text(char *text) {
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (apply_command(line)) fprintf(stderr, "fake_nvml: bad control line: %s\n", line);
    }
}

/* Write the limits in force to $FAKE_NVML_STATE (see the header), if it is set. */
static void dump_state(void) {
    const char *path = getenv("FAKE_NVML_STATE");
    if (path == NULL) return;
    char temporary[4096];
    if (snprintf(temporary, sizeof temporary, "%s.tmp", path) >= (int)sizeof temporary) return;
    FILE *f = fopen(temporary, "w");
    if (f == NULL) return;
    fprintf(f, "count %u set_calls %lu\n", gpu_count, set_calls);
    for (unsigned int i = 0; i < gpu_count; i++) {
        const struct fake_gpu *g = &gpus[i];
        unsigned int enforced = (g->limiter_mw && g->limiter_mw < g->limit_mw) ? g->limiter_mw : g->limit_mw;
        fprintf(f, "gpu %u limit_mw %u enforced_mw %u min_mw %u max_mw %u default_mw %u\n", i, g->limit_mw,
                enforced, g->min_mw, g->max_mw, g->default_mw);
    }
    if (fclose(f) == 0) rename(temporary, path);
}

/* Apply the lines added to $FAKE_NVML_CONTROL since the last read, if it changed. */
static void refresh_from_control_file(void) {
    const char *path = getenv("FAKE_NVML_CONTROL");
    struct stat st;
    if (path == NULL || stat(path, &st) != 0) return;
    if (st.st_ino == control.ino && st.st_size == control.size &&
        st.st_mtim.tv_sec == control.mtime.tv_sec && st.st_mtim.tv_nsec == control.mtime.tv_nsec)
        return;
    if (st.st_ino != control.ino || st.st_size < control.offset) control.offset = 0;
    FILE *f = fopen(path, "r");
    if (f == NULL) return;
    control.ino = st.st_ino;
    control.size = st.st_size;
    control.mtime = st.st_mtim;
    if (fseek(f, control.offset, SEEK_SET) == 0 && st.st_size > control.offset) {
        size_t want = (size_t)(st.st_size - control.offset);
        char *text = malloc(want + 1);
        size_t got = text ? fread(text, 1, want, f) : 0;
        /* apply complete lines only; a half-written last line waits for the next call */
        while (got > 0 && text[got - 1] != '\n') got--;
        if (text && got > 0) {
            text[got] = '\0';
            control.offset += (long)got;
            apply_text(text);
            dump_state();
        }
        free(text);
    }
    fclose(f);
}

__attribute__((constructor)) static void fake_nvml_load(void) { reset_state(); }

/* ------------------------------------------------------------------- call bookkeeping */

static void count_call(const char *fn) {
    for (int i = 0; i < n_counters; i++) {
        if (strcmp(counters[i].fn, fn) == 0) {
            counters[i].count++;
            return;
        }
    }
    if (n_counters < MAX_COUNTERS) {
        snprintf(counters[n_counters].fn, sizeof counters[0].fn, "%s", fn);
        counters[n_counters++].count = 1;
    }
}

static nvmlReturn_t injected(const char *fn, int gpu) {
    for (int i = 0; i < n_injections; i++) {
        struct injection *inj = &injections[i];
        if (inj->remaining == 0 || strcmp(inj->fn, fn) != 0) continue;
        if (inj->gpu != -1 && inj->gpu != gpu) continue;
        if (inj->remaining > 0) inj->remaining--;
        return inj->code;
    }
    return NVML_SUCCESS;
}

/* Every entry point starts here: pick up control changes, count, check init, inject. */
static nvmlReturn_t enter(const char *fn, int gpu, int needs_init) {
    refresh_from_control_file();
    count_call(fn);
    if (needs_init && init_refcount == 0) return NVML_ERROR_UNINITIALIZED;
    return injected(fn, gpu);
}

static int index_of(nvmlDevice_t device) {
    if (device < gpus || device >= gpus + gpu_count) return -1;
    return (int)(device - gpus);
}

#define ENTER_DEVICE(device)                                     \
    int gpu = index_of(device);                                  \
    nvmlReturn_t entered = enter(__func__, gpu, 1);              \
    if (entered != NVML_SUCCESS) return entered;                 \
    if (gpu < 0) return NVML_ERROR_INVALID_ARGUMENT;             \
    struct fake_gpu *g = &gpus[gpu];

#define ENTER_LIBRARY(needs_init)                                \
    do {                                                         \
        nvmlReturn_t entered = enter(__func__, -1, needs_init);  \
        if (entered != NVML_SUCCESS) return entered;             \
    } while (0)

static nvmlReturn_t copy_text(char *out, unsigned int length, const char *text) {
    if (out == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------- NVML entry points */

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    ENTER_LIBRARY(0);
    init_refcount++;
    dump_state();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) {
    ENTER_LIBRARY(0);
    init_refcount++;
    dump_state();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlShutdown(void) {
    ENTER_LIBRARY(1);
    init_refcount--;
    return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER_LIBRARY(1);
    return copy_text(version, length, driver_version);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER_LIBRARY(1);
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu_count;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t entered = enter(__func__, index < MAX_GPUS ? (int)index : -2, 1);
    if (entered != NVML_SUCCESS) return entered;
    if (device == NULL || index >= gpu_count) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    ENTER_DEVICE(device);
    (void)g;
    *index = (unsigned int)gpu;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER_DEVICE(device);
    return copy_text(uuid, length, g->uuid);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER_DEVICE(device);
    return copy_text(name, length, g->name);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power_mw) {
    ENTER_DEVICE(device);
    *power_mw = g->power_mw;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit_mw) {
    ENTER_DEVICE(device);
    *limit_mw = g->limit_mw;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(
    nvmlDevice_t device, unsigned int *min_mw, unsigned int *max_mw) {
    ENTER_DEVICE(device);
    *min_mw = g->min_mw;
    *max_mw = g->max_mw;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                             unsigned int *limit_mw) {
    ENTER_DEVICE(device);
    *limit_mw = g->default_mw;
    return NVML_SUCCESS;
}

static unsigned int enforced_mw(const struct fake_gpu *g) {
    return (g->limiter_mw && g->limiter_mw < g->limit_mw) ? g->limiter_mw : g->limit_mw;
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit_mw) {
    ENTER_DEVICE(device);
    *limit_mw = enforced_mw(g);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit_mw) {
    int gpu = index_of(device);
    nvmlReturn_t rc = enter(__func__, gpu, 1);
    if (rc == NVML_SUCCESS && gpu < 0) rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && (limit_mw < gpus[gpu].min_mw || limit_mw > gpus[gpu].max_mw))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) gpus[gpu].limit_mw = limit_mw;
    /* record every attempt, failed ones included */
    set_calls++;
    const char *log_path = getenv("FAKE_NVML_SET_LOG");
    FILE *log = log_path ? fopen(log_path, "a") : NULL;
    if (log) {
        fprintf(log, "nvmlDeviceSetPowerManagementLimit gpu=%d limit_mw=%u rc=%d\n", gpu, limit_mw,
                rc);
        fclose(log);
    }
    if (rc == NVML_SUCCESS) dump_state();
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor,
                                             unsigned int *temp_c) {
    ENTER_DEVICE(device);
    if (sensor != NVML_TEMPERATURE_GPU) return NVML_ERROR_NOT_SUPPORTED;
    *temp_c = g->temp_c;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_v1_t *temp) {
    ENTER_DEVICE(device);
    if (temp == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (temp->version != NVML_TEMPERATURE_V1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (temp->sensorType != NVML_TEMPERATURE_GPU) return NVML_ERROR_NOT_SUPPORTED;
    temp->temperature = (int)g->temp_c;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device, unsigned int threshold,
                                                      unsigned int *temp_c) {
    ENTER_DEVICE(device);
    if (threshold == NVML_TEMPERATURE_THRESHOLD_SHUTDOWN) *temp_c = g->shutdown_c;
    else if (threshold == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) *temp_c = g->slowdown_c;
    else return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                        unsigned long long *energy_mj) {
    ENTER_DEVICE(device);
    *energy_mj = g->energy_mj;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_v2_t *infos) {
    ENTER_DEVICE(device);
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (infos == NULL || *count < g->nprocs) {
        *count = g->nprocs;
        return g->nprocs ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    }
    for (unsigned int i = 0; i < g->nprocs; i++) {
        infos[i].pid = g->pids[i];
        infos[i].usedGpuMemory = 1ull << 30;
        infos[i].gpuInstanceId = 0xffffffffu;
        infos[i].computeInstanceId = 0xffffffffu;
    }
    *count = g->nprocs;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------ control API (for ctypes) */

/* Apply one command line; 0 on success, -1 when it does not parse. */
EXPORT int fake_nvml_command(const char *line) { return apply_command(line); }

/* Calls of nvmlDeviceSetPowerManagementLimit since the last reset, failed ones included. */
EXPORT unsigned long fake_nvml_set_calls(void) { return set_calls; }

/* Calls of one NVML function since the last reset. */
EXPORT unsigned long fake_nvml_calls(const char *fn) {
    for (int i = 0; i < n_counters; i++)
        if (strcmp(counters[i].fn, fn) == 0) return counters[i].count;
    return 0;
}

EXPORT unsigned int fake_nvml_limit_mw(int gpu) {
    return (gpu >= 0 && gpu < MAX_GPUS) ? gpus[gpu].limit_mw : 0;
}

EXPORT unsigned int fake_nvml_enforced_mw(int gpu) {
    return (gpu >= 0 && gpu < MAX_GPUS) ? enforced_mw(&gpus[gpu]) : 0;
}

/* nvmlInit calls not yet matched by nvmlShutdown. */
EXPORT int fake_nvml_init_refcount(void) { return init_refcount; }
