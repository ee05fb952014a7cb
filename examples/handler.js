// A JavaScript handler: logs, a secret, and agent memory through the broker.
//   input: {"user": "..."}   secrets: ["GREETING_KEY"]   flow: any flow id
exports.handler = function handler(ax, input) {
  const { value: key, found } = ax.secrets.get('GREETING_KEY');
  ax.log.info('greeting', { user: input.user, have_key: found });
  // Compare-and-set, so concurrent executions never lose a visit.
  for (;;) {
    const { value, version } = ax.agent.memory.getVersioned('visits:' + input.user);
    const r = ax.agent.memory.cas('visits:' + input.user, version, (value || 0) + 1);
    if (r.ok) return { hello: input.user, visits: (value || 0) + 1, signed_with: key };
  }
};
