"""A stand-in for `gcloud` in tests (tests/test_launch_tpu.py puts it on PATH): it records every call
and plays the scenario that the test wrote.

Everything lives in $FAKE_GCLOUD_DIR: calls.jsonl (each call's arguments, one JSON list a line),
state.json (the queued resources and counters) and scenario.json, whose keys are
  states            queued-resource states that describe reports after a create, one per call, the
                    last one sticking (default ['ACTIVE']), e.g. WAITING_FOR_RESOURCES, PROVISIONING
  quota             true: create fails with a quota error
  install_failures  the first N installs (ssh --worker=all with pip install) fail on worker 1
  preempt           {slice: N}: the first N incarnations of a slice are preempted by their first run:
                    every worker's ssh exits 255, the queued resource turns SUSPENDED, the VM PREEMPTED
  worker_dies       N: until the launcher stopped a slice's leftovers N times, its runs lose
                    worker 1 (exit 137) while the other workers hang
  fail_runs         {substring: N}: a run whose command contains it exits 1, its first N times on
                    each worker
gs:// objects (gcloud storage cat / cp) are files under $FAKE_GCLOUD_DIR/gcs.
"""
import fcntl
import json
import os
import shutil
import sys
import time

DIR = os.environ['FAKE_GCLOUD_DIR']


def flag(args, name, default=''):
  return next((a.split('=', 1)[1] for a in args if a.startswith(f'--{name}=')), default)


def fail(code, message):
  print(message, file=sys.stderr)
  return code


def qr_state(qr, scenario):
  if qr.get('state'):
    return qr['state']
  states = scenario.get('states', ['ACTIVE'])
  return states[min(qr['describes'], len(states) - 1)]


def bump(counters, key):
  counters[key] = counters.get(key, 0) + 1
  return counters[key]


def gcs_path(url):
  return os.path.join(DIR, 'gcs', url[len('gs://'):])


def handle(args, state, scenario):
  """Returns (exit code, seconds to hang before exiting)."""
  qrs, counters = state['qrs'], state['counters']
  name = args[4] if len(args) > 4 else ''
  qr = qrs.get(name)
  verb = ' '.join(args[:4])
  not_found = f'ERROR: (gcloud) NOT_FOUND: Resource {name!r} was not found'
  if verb == 'compute tpus queued-resources create':
    if scenario.get('quota'):
      return fail(1, "ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: "
                     "Quota 'TPUV5PPreemptiblePodPerProjectPerZone' exhausted. Limit: 0"), 0
    if qr:
      return fail(1, f'ERROR: (gcloud) ALREADY_EXISTS: {name}'), 0
    incarnation = bump(counters, f'create/{name}')
    qrs[name] = dict(accelerator=flag(args, 'accelerator-type'), describes=0, state='',
                     preempt=incarnation <= scenario.get('preempt', {}).get(name, 0))
    return 0, 0
  if verb == 'compute tpus queued-resources describe':
    if not qr:
      return fail(1, not_found), 0
    s = qr_state(qr, scenario)
    qr['describes'] += 1
    print(json.dumps(dict(name=name, state=dict(state=s), tpu=dict(nodeSpec=[dict(
        nodeId=name, node=dict(acceleratorType=qr['accelerator']))]))))
    return 0, 0
  if verb == 'compute tpus queued-resources delete':
    if not qr:
      return fail(1, not_found), 0
    del qrs[name]
    return 0, 0
  if verb == 'compute tpus tpu-vm describe':
    if not qr:
      return fail(1, not_found), 0
    print({'ACTIVE': 'READY', 'SUSPENDED': 'PREEMPTED'}.get(qr_state(qr, scenario), 'CREATING'))
    return 0, 0
  if args[:2] == ['storage', 'cat']:
    if not os.path.isfile(gcs_path(args[2])):
      return fail(1, f'ERROR: (gcloud.storage.cat) The following URLs matched no objects: {args[2]}'), 0
    with open(gcs_path(args[2])) as f:
      sys.stdout.write(f.read())
    return 0, 0
  if args[:2] == ['storage', 'cp']:
    os.makedirs(os.path.dirname(gcs_path(args[3])), exist_ok=True)
    shutil.copy(args[2], gcs_path(args[3]))
    return 0, 0
  if args[:3] == ['compute', 'tpus', 'tpu-vm'] and args[3] in ('ssh', 'scp'):
    if args[3] == 'scp':
      name = args[5].split(':')[0]
      qr = qrs.get(name)
    if not qr or qr_state(qr, scenario) != 'ACTIVE':
      return fail(255, f'ssh: connect to host {name}: Connection refused'), 0
    if args[3] == 'scp':
      return 0, 0
    command, worker = flag(args, 'command'), flag(args, 'worker')
    if 'pip install' in command:
      if bump(counters, 'install') <= scenario.get('install_failures', 0):
        print('worker 1: ERROR: Could not find a version that satisfies the requirement jax[tpu]')
        return 1, 0
      return 0, 0
    if 'exec ' not in command:  # the stop script
      bump(counters, f'stop/{name}')
      return 0, 0
    if qr['preempt']:
      qr['state'] = 'SUSPENDED'
      return fail(255, f'Connection to {name} closed by remote host.'), 0
    if counters.get(f'stop/{name}', 0) < scenario.get('worker_dies', 0):
      return (fail(137, 'Killed'), 0) if worker == '1' else (0, 30)
    for key, times in scenario.get('fail_runs', {}).items():
      if key in command and bump(counters, f'fail/{key}/{worker}') <= times:
        return fail(1, f'Traceback: run {key} failed'), 0
    print(f'fake run on worker {worker}: {command.split("exec ")[-1]}')
    return 0, 0
  return 0, 0


def main():
  args = sys.argv[1:]
  with open(os.path.join(DIR, 'lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(os.path.join(DIR, 'calls.jsonl'), 'a') as f:
      f.write(json.dumps(args) + '\n')
    path = os.path.join(DIR, 'state.json')
    state = json.load(open(path)) if os.path.isfile(path) else dict(qrs={}, counters={})
    scenario_path = os.path.join(DIR, 'scenario.json')
    scenario = json.load(open(scenario_path)) if os.path.isfile(scenario_path) else {}
    code, hang = handle(args, state, scenario)
    with open(path + '.tmp', 'w') as f:
      json.dump(state, f)
    os.replace(path + '.tmp', path)
  sys.stdout.flush()
  time.sleep(hang)  # a worker stuck in a collective: the launcher must kill it
  return code


if __name__ == '__main__':
  sys.exit(main())
