-- pipe.lua: placeholder until this part is written.
return {}
