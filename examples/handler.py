# A python handler: logs, a secret, and agent memory through the broker.
#   input: {"user": "..."}   secrets: ["GREETING_KEY"]   flow: any flow id
def handler(ax, input):
    key, found = ax.secrets.get("GREETING_KEY")
    ax.log.info("greeting", user=input["user"], have_key=found)
    # Durable per (tenant, flow): counts visits across executions.
    visits = ax.agent.memory.get("visits:" + input["user"], 0) + 1
    ax.agent.memory.put("visits:" + input["user"], visits)
    # The key's value is redacted in the stored output: "[REDACTED:GREETING_KEY]".
    return {"hello": input["user"], "visits": visits, "signed_with": key}
